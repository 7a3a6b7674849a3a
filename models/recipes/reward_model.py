"""Reward-model recipe: a Bradley–Terry scorer of (prompt, completion) on the one DeepSpeed engine loop.

The model is `models.modeling.heads.RewardModel`: the starting checkpoint's backbone plus a scalar head read at
the last real token of prompt + completion + EOS (ending every sequence with EOS gives the head one
fixed place to read, whatever the completion's last token is). Pairs come from the same place as
DPO's (`models.recipes.dpo.prepare_pairs`: a preference file, or correct-vs-incorrect samples of the
starting policy, cached in `workdir/pairs.jsonl`).

Per step: one forward over the 2 x pairs sequences (chosen rows, then rejected rows) and
    loss = mean over pairs of -log sigma(s_c - s_r - margin)          (InstructGPT, Ouyang et al. 2022, eq. 1)
         + c * mean over pairs of (s_c + s_r)^2                       (Eisenstein et al. 2023, eq. 2; optional)
with every mean taken over the *global* batch of pairs, so micro-batching gives the one-batch gradient.

The output directory is what `RewardModel.load` reads (an HF causal-LM dir + score_head.safetensors)
plus the tokenizer and a `posttrain.json` whose "kind" is "reward_model" (and the max_seq_len the
scorer must cut to). `load_reward_scorer` turns such a directory into a batched reward function.

What this does not do: ensembles, per-token rewards, or LM-loss regularisation of the backbone.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from models.training.batching import EpochSampler, pad_right
from models.modeling.chat import completion_end
from models.modeling.device import device_of, to_device, training_device
from models.training.engine import StepContext, loop_result, run_loop
from models.modeling.heads import RewardModel
from models.modeling.lora import ADAPTER_DIR, has_adapters, prepare_backbone, save_adapter
from models.algorithms.losses import bradley_terry_loss
from models.recipes.preference_config import RewardModelConfig
from models.data.preference_pairs import PAIRS_FILE, encode_sequence, prepare_pairs, tokenize_pairs

REWARD_MODEL_KIND = "reward_model"


def collate_scored(seqs: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token rows: input_ids, attention_mask (B, T). RewardModel reads the last 1 of the mask."""
    input_ids, attn = pad_right(seqs, pad_id)
    return {"input_ids": input_ids, "attention_mask": attn}


def reward_step_fn(cfg: RewardModelConfig, pad_id: int):
    """step_fn for run_loop: the chunk's share of the global-batch Bradley–Terry loss and additive
    metrics (loss, accuracy, margin = mean s_c - s_r; means over the global batch once summed)."""

    def step(engine, chunk: list[dict], ctx: StepContext):
        n_pairs = len(ctx.global_batch)
        b = len(chunk)
        batch = to_device(collate_scored([it["chosen"][0] for it in chunk] + [it["rejected"][0] for it in chunk], pad_id),
                          device_of(engine))
        scores = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])  # (2b,)
        s_c, s_r = scores[:b], scores[b:]
        margin = None
        if any(it["margin"] is not None for it in chunk):  # TRL's optional `margin` column (Llama 2, eq. 2)
            margin = torch.tensor([it["margin"] or 0.0 for it in chunk], dtype=s_c.dtype, device=s_c.device)
        bt_mean, acc = bradley_terry_loss(s_c, s_r, margin)
        contribution = bt_mean * (b / n_pairs)  # the chunk mean times its share = its sum / n_pairs
        if cfg.center_rewards_coefficient:
            contribution = contribution + cfg.center_rewards_coefficient * ((s_c + s_r) ** 2).sum() / n_pairs
        metrics = {
            "loss": float(contribution.detach()),
            "accuracy": float(acc) * b / n_pairs,
            "margin": float((s_c - s_r).detach().sum()) / n_pairs,
        }
        return contribution * ctx.loss_scale, metrics

    return step


def save_reward_model_dir(tokenizer, base_dir: str | None, max_seq_len: int, chat_template: str | None = None):
    """A save_model callback: `RewardModel.save` (merged, with the backbone's LoRA adapter alone in
    `out/adapter/`) + tokenizer + generation config + posttrain.json (the base's, with kind
    "reward_model" and the max_seq_len and chat_template the scorer must use)."""

    def save(module: RewardModel, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        module.save(out)
        if has_adapters(module.pretrained_model):
            save_adapter(module.pretrained_model, out / ADAPTER_DIR, base_dir)
        tokenizer.save_pretrained(out)
        meta = {}
        if base_dir:
            src = Path(base_dir)
            if (src / "generation_config.json").exists():
                shutil.copy2(src / "generation_config.json", out / "generation_config.json")
            if (src / "posttrain.json").exists():
                meta = json.loads((src / "posttrain.json").read_text())
        meta.update(kind=REWARD_MODEL_KIND, max_seq_len=max_seq_len, chat_template=chat_template)
        (out / "posttrain.json").write_text(json.dumps(meta, indent=2) + "\n")

    return save


def train_reward_model(spec: dict, on_log=None) -> dict:
    """spec: config (RewardModelConfig dict), base_path (starting checkpoint), workdir, and
    `dataset_path` (a preference file) or `prompts_path` (problems, for on-policy pairs).
    Returns the loop result plus num_examples (pairs), dropped_examples, pairs_path."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = RewardModelConfig.model_validate(spec["config"])
    workdir = Path(spec["workdir"])
    torch.manual_seed(cfg.seed)
    tokenizer = AutoTokenizer.from_pretrained(spec["base_path"])
    backbone = AutoModelForCausalLM.from_pretrained(spec["base_path"], dtype=torch.float32)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    rows = prepare_pairs(spec, cfg, backbone, tokenizer)  # on-policy: samples of the starting policy
    items, dropped = tokenize_pairs(rows, tokenizer, cfg.max_seq_len, cfg.chat_template)
    if not items:
        raise ValueError(f"no preference pair fits max_seq_len={cfg.max_seq_len}")
    prepare_backbone(backbone, cfg)  # LoRA adapters / gradient checkpointing; the score head trains in full
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # the head's init depends on the seed only
        model = RewardModel(backbone)
    out_emb, in_emb = backbone.get_output_embeddings(), backbone.get_input_embeddings()
    if out_emb is not None and out_emb.weight is not in_emb.weight:
        out_emb.requires_grad_(False)  # an untied LM head is never in the forward pass
    sampler = EpochSampler(len(items), cfg.seed)

    def global_batch(step: int) -> list[dict]:
        return [items[i] for i in sampler.indices(step * cfg.batch_size, cfg.batch_size)]

    res = run_loop(
        model, cfg, workdir, global_batch, reward_step_fn(cfg, pad_id),
        save_reward_model_dir(tokenizer, spec["base_path"], cfg.max_seq_len, cfg.chat_template), on_log=on_log,
    )
    return loop_result(res, num_examples=len(items), dropped_examples=dropped, format="preference",
                       pairs_path=str(workdir / PAIRS_FILE))


# ----------------------------------------------------------------------------- scoring


def load_reward_scorer(
    path: str | Path, batch_size: int = 64
) -> Callable[[list[str], list[str]], list[float]]:
    """A reward function over a trained reward-model directory: (prompts, completions) -> scores.

    Sequences are built exactly as in training (`models.recipes.dpo.encode_sequence` with the
    max_seq_len and chat_template recorded in posttrain.json) and scored `batch_size` at a time, in
    inference mode. A prompt is a string or a conversation.
    Raises ValueError if the directory is not a reward model (posttrain.json kind).
    """
    from transformers import AutoTokenizer

    path = Path(path)
    meta_path = path / "posttrain.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    if meta.get("kind") != REWARD_MODEL_KIND:
        raise ValueError(f"{path}: not a reward model (posttrain.json kind={meta.get('kind')!r})")
    max_seq_len = int(meta.get("max_seq_len") or 10**9)
    tokenizer = AutoTokenizer.from_pretrained(path)
    device = training_device()
    model = RewardModel.load(path, dtype=torch.float32).eval().to(device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    chat_template = meta.get("chat_template")
    end = completion_end(tokenizer, chat_template)

    def score(prompts: list, completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        seqs = [encode_sequence(tokenizer, p, c, max_seq_len, chat_template, end)[0]
                for p, c in zip(prompts, completions)]
        out: list[float] = []
        with torch.inference_mode():
            for start in range(0, len(seqs), batch_size):
                batch = to_device(collate_scored(seqs[start : start + batch_size], pad_id), device)
                out.extend(model(batch["input_ids"], batch["attention_mask"]).float().tolist())
        return out

    return score


__all__ = ["train_reward_model", "reward_step_fn", "load_reward_scorer", "save_reward_model_dir", "REWARD_MODEL_KIND"]
