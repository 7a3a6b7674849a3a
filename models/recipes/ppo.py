"""PPO recipe: RLHF-style PPO with a value head, on the one DeepSpeed engine loop.

The trained module is `CausalLMWithValueHead(policy)`: policy and critic share the backbone
(Ziegler et al. 2019). Each rollout batch (InstructGPT, Ouyang et al. 2022, sec. 3.5):

1. `global_batch(step)`: pick `num_prompts` problems with a seeded per-epoch permutation, sample
   `num_generations` completions of each from the *current* policy (seed derived from (seed,
   rollout index)), and score each completion: weighted verifier rewards plus, when configured,
   `reward_model_weight` x a trained reward model's score. One no-grad forward of the current
   policy + value head gives the old log-probs and values; one of the frozen start policy gives the
   reference log-probs. Then, over the completion tokens (`ppo_targets`):

       r_t   = -kl_coef * KL_t  (+ score at the last token)     Ouyang et al. 2022, eq. 2
       A_t   = GAE(r, V; gamma, lam),  R_t = A_t + V_t          Schulman et al. 2015, eq. 16
       A_t  <- (A_t - mean) / std over ALL completion tokens of the global batch

   Everything is a pure function of (weights, step), so a resumed run regenerates exactly the
   rollouts an uninterrupted run would have seen; every rank builds the whole batch identically.
2. `step_fn`: forward policy + value head on prompt + completion, the clipped surrogate
   (`ppo_policy_loss`) plus vf_coef x the clipped value loss (`ppo_value_loss`), both divided by the
   completion-token count of the *global* batch, so any split into micro-batches, accumulation steps
   and ranks gives the gradient of one big batch (see models/training/engine.py, loss_scale).

With ppo_epochs = E > 1, optimizer steps s, s+1, ..., s+E-1 (s a multiple of E) all train on the
rollouts built at step s (kept in memory; checkpoints only fall on multiples of E, so a resume
always rebuilds them from the same weights).

The critic can start from a zero head (`value_head_init: zeros`, V = 0 everywhere), train at its
own lr (`value_lr_multiplier`) and train alone for the first `critic_warmup` steps (the policy
loss weighted 0): a fresh critic's O(1) noise otherwise dominates GAE's advantages.

What this does not do: mini-batch shuffling within an epoch, adaptive KL control, a critic separate
from the policy, or generation with an inference server.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from models.algorithms.advantages import gae
from models.training.batching import EpochSampler, collate_completions
from models.training.checkpoints import save_hf_dir
from models.modeling.chat import problem_prompt_ids, prompt_text
from models.modeling.device import device_of, to_device
from models.training.engine import StepContext, run_loop
from models.modeling.heads import CausalLMWithValueHead
from models.algorithms.kl import kl_estimate
from models.algorithms.logprobs import entropy_from_logits, masked_sum, masked_whiten, token_logprobs
from models.algorithms.metrics import pairwise_agreement
from models.modeling.lora import prepare_backbone
from models.algorithms.losses import kl_penalized_rewards, ppo_policy_loss, ppo_value_loss
from models.recipes.ppo_config import PPOConfig
from models.algorithms.reasoning import chunk_metrics, marker_flags
from models.recipes.rollout_common import (load_causal_lm, logs_batch, pad_token_id, reference_policy,
                                           spec_problems, reused_batches, rollout_logger, rollout_result, rollout_seed,
                                           sampling_policy, zero3_shadow)
from models.rewards import combine_rewards
from models.rewards.format import has_think_answer_format
from models.generation.rollouts import SamplingParams, sample

VALUE_HEAD_FILE = "value_head.safetensors"
TOKEN_FIELDS = ("old_logprobs", "old_values", "advantages", "returns")
BATCH_STATS = ("advantage_std", "explained_variance", "frac_unjudged")
RM_STATS = ("rm_score_mean", "rm_verifier_agreement")  # with a reward model: its mean raw score and
# pairwise_agreement with the verifier on the batch (models/algorithms/metrics.py)


# ----------------------------------------------------------------------------- pure targets


def ppo_targets(
    scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor, values: torch.Tensor,
    mask: torch.Tensor, cfg: PPOConfig,
) -> dict[str, torch.Tensor]:
    """Per-token rewards, advantages and value targets of a whole global batch.

    Args:
        scores: (B,) float, sequence score (verifier + reward model).
        logprobs, ref_logprobs, values: (B, C) float, old policy / reference / old critic, completion
            token j of row i at [i, j].
        mask: (B, C) bool, valid completion tokens.

    Returns (all (B, C), 0 where mask is False):
        kl: per-token KL estimate; rewards: kl_penalized_rewards; raw_advantages: GAE;
        advantages: GAE, whitened over every valid token if cfg.whiten_advantages;
        returns: raw_advantages + values (the critic's regression target, never whitened).
    """
    kl = kl_estimate(logprobs, ref_logprobs, cfg.kl_estimator).masked_fill(~mask, 0.0)
    rewards = kl_penalized_rewards(scores, logprobs, ref_logprobs, mask, cfg.kl_coef, cfg.kl_estimator)
    raw, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    adv = masked_whiten(raw, mask) if cfg.whiten_advantages and int(mask.sum()) > 1 else raw
    return {"kl": kl, "rewards": rewards, "raw_advantages": raw, "advantages": adv, "returns": returns}


# ----------------------------------------------------------------------------- collation


def collate_ppo(items: list[dict], pad_id: int, fields: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """Right-pad prompt + completion. Per-token `fields` and the completion mask are aligned with
    the *shifted* labels (input_ids[:, 1:]): completion token j of a P-token prompt sits at P-1+j."""
    return collate_completions([it["prompt_ids"] for it in items], [it["completion_ids"] for it in items], pad_id,
                               {f: [it[f] for it in items] for f in fields})


def policy_forward(module, batch: dict, temperature: float):
    """(logprobs (b, n-1), values (b, n-1), shifted logits (b, n-1, V)) of a collated batch; the value
    at shifted index t is V of the prefix that predicts label t (the state before that action)."""
    logits, values = module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    logits = logits[:, :-1].float()
    return token_logprobs(logits, batch["input_ids"][:, 1:], temperature), values[:, :-1].float(), logits


def _completion_rows(x: torch.Tensor, items: list[dict], width: int) -> torch.Tensor:
    """Shifted (b, n-1) layout -> completion layout (b, width), row i's tokens left-aligned."""
    out = x.new_zeros((len(items), width))
    for i, it in enumerate(items):
        p, c = len(it["prompt_ids"]), len(it["completion_ids"])
        out[i, :c] = x[i, p - 1 : p - 1 + c]
    return out


# ----------------------------------------------------------------------------- batch building


def score_completions(rollouts, problems, cfg: PPOConfig, reward_fn, reward_scorer):
    """(scores, correct, unjudged, rm): sequence scores (unjudged verifiers count 0), whether the
    built-in verifier (or the verifier total) judged a completion >= 1, whether no verifier could,
    and the reward model's raw scores (None without one)."""
    n = len(rollouts)
    verifier, correct, unjudged = [0.0] * n, [False] * n, [False] * n
    if reward_fn is not None:
        key = "builtin_task" if "builtin_task" in cfg.rewards else None
        for i, r in enumerate(rollouts):
            p = problems[r.prompt_index]
            total, parts = reward_fn(prompt_text(p["prompt"]), r.completion_text, p["answer"])
            judged = parts.get(key) if key else total
            verifier[i] = 0.0 if total is None else float(total)
            correct[i], unjudged[i] = judged is not None and judged >= 1.0, total is None
    if reward_scorer is None:
        return verifier, correct, unjudged, None
    rm = [float(s) for s in reward_scorer([problems[r.prompt_index]["prompt"] for r in rollouts],
                                          [r.completion_text for r in rollouts])]
    return [v + cfg.reward_model_weight * s for v, s in zip(verifier, rm)], correct, unjudged, rm


def make_global_batch(model, tokenizer, problems: list[dict], cfg: PPOConfig, *, ref_model=None,
                      reward_scorer=None, shadow=None, on_batch=None):
    """`global_batch(step)` for run_loop. `model` is the CausalLMWithValueHead being trained,
    `ref_model` the frozen start policy (None: KL 0), `reward_scorer(prompts, completions)` a reward
    model's scores, `shadow` a plain copy of `model` for ZeRO-3 (see rollout_common.sampling_policy)."""
    sampler = EpochSampler(len(problems), cfg.seed)
    reward_fn = combine_rewards(cfg.rewards) if cfg.rewards else None
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=1.0,
                            top_k=0, stop_strings=tuple(cfg.stop_strings))
    pad_id = pad_token_id(tokenizer)
    prompt_ids = problem_prompt_ids(tokenizer, cfg.chat_template)

    def build(step: int, rollout_index: int) -> list[dict]:
        picked = [problems[i] for i in sampler.indices(rollout_index * cfg.num_prompts, cfg.num_prompts)]
        with sampling_policy(model, shadow) as policy, torch.no_grad():
            rollouts = sample(policy.pretrained_model, tokenizer, [prompt_ids(p) for p in picked],
                              cfg.num_generations, params, seed=rollout_seed(cfg.seed, rollout_index),
                              batch_size=cfg.rollout_batch_size)
            items = [{"index": i, "prompt_ids": list(r.prompt_ids), "completion_ids": list(r.completion_ids),
                      "behaviour_logprobs": list(r.logprobs)} for i, r in enumerate(rollouts)]
            policy.eval()
            width = max(len(it["completion_ids"]) for it in items)
            cols: dict[str, list[torch.Tensor]] = {"lp": [], "ref": [], "val": []}
            for s in range(0, len(items), cfg.micro_batch_size):  # the training chunks' padding
                chunk = items[s : s + cfg.micro_batch_size]
                batch = to_device(collate_ppo(chunk, pad_id), device_of(policy))
                lp, val, _ = policy_forward(policy, batch, cfg.temperature)
                ref = lp
                if ref_model is not None:
                    ref_logits = ref_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    ref = token_logprobs(ref_logits[:, :-1].float(), batch["input_ids"][:, 1:], cfg.temperature)
                for key, x in (("lp", lp), ("ref", ref), ("val", val)):
                    cols[key].append(_completion_rows(x, chunk, width))
        lp, ref, val = (torch.cat(cols[k]) for k in ("lp", "ref", "val"))
        lengths = torch.tensor([len(it["completion_ids"]) for it in items], device=lp.device)
        mask = torch.arange(width, device=lp.device)[None, :] < lengths[:, None]
        scores, correct, unjudged, rm = score_completions(rollouts, picked, cfg, reward_fn, reward_scorer)
        t = ppo_targets(torch.tensor(scores, device=lp.device), lp, ref, val, mask, cfg)
        raw = t["raw_advantages"][mask]
        resid_var = (t["returns"] - val)[mask].var() if raw.numel() > 1 else torch.tensor(0.0)
        ret_var = t["returns"][mask].var() if raw.numel() > 1 else torch.tensor(0.0)
        stats = {
            "advantage_std": float(raw.std()) if raw.numel() > 1 else 0.0,
            # 1 - Var(R - V) / Var(R): how much of the return the critic explains (Huang et al. 2022)
            "explained_variance": float(1 - resid_var / ret_var) if float(ret_var) > 0 else 0.0,
            "frac_unjudged": sum(unjudged) / len(items),
        }
        if rm is not None:
            # does the reward model rank this batch's correct completions above the incorrect ones
            # of the same prompt? 0.5 = chance, and the value when no prompt has both (no verifier: none has)
            agree, pairs = pairwise_agreement(rm, correct, [r.prompt_index for r in rollouts])
            stats.update(rm_score_mean=sum(rm) / len(rm),
                         rm_verifier_agreement=agree if pairs else 0.5)
        for i, (it, ro) in enumerate(zip(items, rollouts)):
            c = len(it["completion_ids"])
            p = picked[ro.prompt_index]
            row = {k: t[k][i, :c].tolist() for k in ("rewards", "advantages", "returns")}
            it.update(row, prompt_id=p["id"], prompt=p["prompt"], completion_text=ro.completion_text,
                      finish_reason=ro.finish_reason, score=scores[i], correct=bool(correct[i]),
                      old_logprobs=lp[i, :c].tolist(), ref_logprobs=ref[i, :c].tolist(),
                      old_values=val[i, :c].tolist(), kl=float(t["kl"][i].sum()), stats=stats,
                      formatted=has_think_answer_format(ro.completion_text),
                      markers=marker_flags(ro.completion_text, cfg.reasoning_markers))
        if on_batch is not None:
            on_batch(step, items)
        return items

    return reused_batches(build, cfg.ppo_epochs, "ppo_epochs")


# ----------------------------------------------------------------------------- loss


def ppo_step_fn(cfg: PPOConfig, pad_id: int):
    """step_fn for run_loop: the chunk's share of the global PPO loss and additive metrics."""

    def step(engine, chunk: list[dict], ctx: StepContext):
        gb = ctx.global_batch
        n_seq = len(gb)
        n_tok = max(1, sum(len(it["completion_ids"]) for it in gb))  # the global token_mean normaliser

        batch = to_device(collate_ppo(chunk, pad_id, TOKEN_FIELDS), device_of(engine))
        logprobs, values, logits = policy_forward(engine, batch, cfg.temperature)
        mask = batch["completion_mask"]
        pg, pm = ppo_policy_loss(logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                 cfg.cliprange, "token_mean", normalizer=n_tok)
        vf, vm = ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                cfg.cliprange_value, normalizer=n_tok)
        pg_weight = 0.0 if ctx.step < cfg.critic_warmup else 1.0  # critic warm-up: value loss alone
        loss = pg_weight * pg + cfg.vf_coef * vf
        with torch.no_grad():
            entropy = masked_sum(entropy_from_logits(logits.detach() / cfg.temperature), mask)
            value_sum = masked_sum(values.detach(), mask)
            gap = sum(abs(a - b) for it in chunk for a, b in zip(it["old_logprobs"], it["behaviour_logprobs"]))
        share = float(mask.sum()) / n_tok  # the loss functions' metrics are means over this chunk
        metrics = {
            "loss": float(loss.detach()),
            "pg_loss": float(pg.detach()),
            "vf_loss": float(vf.detach()),
            "clip_fraction": float(pm["clip_fraction"]) * share,
            "clip_low": float(pm["clip_low_fraction"]) * share,
            "clip_high": float(pm["clip_high_fraction"]) * share,
            "approx_kl": float(pm["approx_kl"]) * share,
            "vf_clip_fraction": float(vm["vf_clip_fraction"]) * share,
            "value_mean": float(value_sum) / n_tok,
            "entropy": float(entropy) / n_tok,
            "kl": sum(it["kl"] for it in chunk) / n_tok,  # per-token mean of the reward's KL estimate
            "reward_mean": sum(sum(it["rewards"]) for it in chunk) / n_seq,  # score - kl_coef * KL
            "score_mean": sum(it["score"] for it in chunk) / n_seq,
            "accuracy": sum(it["correct"] for it in chunk) / n_seq,
            "completion_length": sum(len(it["completion_ids"]) for it in chunk) / n_seq,
            "frac_truncated": sum(it["finish_reason"] == "length" for it in chunk) / n_seq,
            # trainer-side old log-probs vs the sampler's (~0 at top_p = 1): checks the alignment
            "logprob_gap": gap / n_tok,
            **chunk_metrics(chunk, ctx.global_batch),
        }
        first = chunk[0]["index"] == 0  # batch-level statistics once per step
        stats = chunk[0]["stats"]  # one dict per global batch, the same on every rank
        keys = BATCH_STATS + (RM_STATS if "rm_score_mean" in stats else ())
        metrics.update({k: (stats[k] if first else 0.0) for k in keys})
        return loss * ctx.loss_scale, metrics

    return step


# ----------------------------------------------------------------------------- saving, logging


def save_policy_and_value_head(tokenizer, base_path: str | None):
    """save_model callback: the policy as a plain HF causal-LM dir (what evaluation and later
    stages load) plus the value head as value_head.safetensors beside it."""
    save_policy = save_hf_dir(tokenizer, base_path)

    def save(module: CausalLMWithValueHead, out: Path) -> None:
        save_policy(module.pretrained_model, out)
        state = {k: v.detach().clone().contiguous() for k, v in module.value_head.state_dict().items()}
        save_file(state, str(Path(out) / VALUE_HEAD_FILE))

    return save


def rollout_rows(step: int, items: list[dict], cfg: PPOConfig) -> list[dict]:
    """Rows of the rollout sample (data_contracts.rollouts columns plus step and finish_reason);
    `advantage` is the row's mean (whitened) token advantage, `reward` its sequence score."""
    return [
        {"step": step + 1, "prompt_id": it["prompt_id"], "prompt": prompt_text(it["prompt"]),
         "completion": it["completion_text"], "reward": float(it["score"]),
         "advantage": sum(it["advantages"]) / max(1, len(it["advantages"])),
         "length": len(it["completion_ids"]), "finish_reason": it["finish_reason"]}
        for it in items[: cfg.log_rollouts * cfg.num_generations]
    ]


def should_log_rollouts(step: int, cfg: PPOConfig) -> bool:
    return logs_batch(step, cfg.ppo_epochs, cfg.save_every, cfg.log_rollouts)


# ----------------------------------------------------------------------------- recipe


def train_ppo(spec: dict, on_log=None) -> dict:
    """spec: config (PPOConfig dict), base_path (HF dir of the start policy), prompts_path
    (problems file: id, prompt, answer), workdir, optional reward_model_path (a reward_model stage's
    output; overrides config.reward_model). Returns the loop result plus rollouts_path."""
    from transformers import AutoTokenizer

    cfg = PPOConfig.model_validate(spec["config"])
    rm_path = spec.get("reward_model_path") or cfg.reward_model
    if not cfg.rewards and not rm_path:
        raise ValueError("config.rewards is empty and no reward model is given: nothing would score the completions")
    workdir = Path(spec["workdir"])
    problems = spec_problems(spec, cfg, "train_ppo")
    torch.manual_seed(cfg.seed)  # fixes the value head's init
    tokenizer = AutoTokenizer.from_pretrained(spec["base_path"])
    model = CausalLMWithValueHead(prepare_backbone(load_causal_lm(spec["base_path"]), cfg), cfg.value_head_init)
    pad_id = pad_token_id(tokenizer)

    shadow = zero3_shadow(model, cfg)
    # the frozen start policy (LoRA: the policy with adapters off)
    ref_model = reference_policy(model.pretrained_model, spec["base_path"], cfg) if cfg.kl_coef > 0 else None
    reward_scorer = None
    if rm_path:
        from models.recipes.reward_model import load_reward_scorer

        reward_scorer = load_reward_scorer(rm_path)

    params = None
    if cfg.value_lr_multiplier != 1.0:
        params = [{"params": list(model.pretrained_model.parameters())},
                  {"params": list(model.value_head.parameters()), "lr": cfg.lr * cfg.value_lr_multiplier}]

    rollouts_path, log_batch = rollout_logger(
        workdir, lambda step: should_log_rollouts(step, cfg), lambda step, items: rollout_rows(step, items, cfg)
    )
    global_batch = make_global_batch(model, tokenizer, problems, cfg, ref_model=ref_model,
                                     reward_scorer=reward_scorer, shadow=shadow, on_batch=log_batch)
    res = run_loop(model, cfg, workdir, global_batch, ppo_step_fn(cfg, pad_id),
                   save_policy_and_value_head(tokenizer, spec["base_path"]), on_log=on_log, params=params)
    return rollout_result(res, rollouts_path, problems)


__all__ = ["train_ppo", "make_global_batch", "ppo_step_fn", "ppo_targets", "collate_ppo", "VALUE_HEAD_FILE"]
