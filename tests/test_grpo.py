"""GRPO recipe: config validation, batch building, the loss split over micro-batches, a short
training run, exact resume, and (slow) ZeRO-3 on two ranks against ZeRO-0 on one."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

# conftest.py sets this too; kept so the file also runs on its own (shm_comm compiles once, ~25 s).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".posttrain" / "torch_extensions"))

from helpers import accumulated_grads, build_half_solved_base, rl_spec  # noqa: E402
from models.training.engine import StepContext, read_metrics  # noqa: E402
from models.training.launch import run_training  # noqa: E402
from models.algorithms.losses import grpo_loss  # noqa: E402
from models.recipes.grpo import (  # noqa: E402
    global_normalizer,
    grpo_step_fn,
    load_problems,
    make_global_batch,
    make_items,
)
from models.training.batching import EpochSampler  # noqa: E402
from models.recipes.rl_config import GRPOConfig  # noqa: E402
from models.generation.rollouts import Rollout  # noqa: E402

TARGET = "models.recipes.grpo:train_grpo"
METRIC_KEYS = {
    "loss", "reward_mean", "reward_std", "accuracy", "kl", "clip_fraction", "entropy",
    "completion_length", "frac_zero_std", "frac_truncated", "frac_unjudged", "logprob_gap",
    "sampling_rounds", "clip_low", "clip_high", "length_correct", "length_incorrect", "format_rate",
    "marker/step_by_step", "marker/self_check",
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base that already half-solves 2-3 operand chains, so rewards vary within groups
    (see helpers.build_half_solved_base)."""
    return build_half_solved_base(tmp_path_factory.mktemp("grpo_base"))


def small_config(**kw) -> dict:
    cfg = dict(num_prompts=4, num_generations=4, max_new_tokens=24, max_steps=4, micro_batch_size=8,
               save_every=1, lr=1e-3, seed=3)
    cfg.update(kw)
    return cfg


def spec_for(base, workdir, **kw) -> dict:
    return rl_spec(base, workdir, small_config(**kw))


def load_policy(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)


def assert_same_weights(path_a, path_b, atol: float = 1e-6) -> None:
    a, _ = load_policy(path_a)
    b, _ = load_policy(path_b)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=atol, msg=name)


# ----------------------------------------------------------------------------- config


def test_config_derives_batch_and_rejects_mismatch():
    c = GRPOConfig(num_prompts=4, num_generations=4)
    assert (c.batch_size, c.micro_batch_size, c.grad_accum) == (16, 16, 1)
    assert GRPOConfig(num_prompts=4, num_generations=4, world_size=2).micro_batch_size == 8
    assert GRPOConfig(num_prompts=4, num_generations=4, batch_size=16, micro_batch_size=4).grad_accum == 4
    # A resolved dump (what the cache key hashes) validates back to the same config.
    assert GRPOConfig.model_validate(c.model_dump()) == c
    assert (GRPOConfig().lr, GRPOConfig().batch_size, GRPOConfig().beta) == (3e-5, 128, 0.0)
    with pytest.raises(ValueError, match=r"num_prompts × num_generations \(4 × 4 = 16\)"):
        GRPOConfig(num_prompts=4, num_generations=4, batch_size=32)
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        GRPOConfig(num_generation=4)
    with pytest.raises(ValueError, match="unknown reward"):
        GRPOConfig(rewards={"nope": 1.0})
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        GRPOConfig(num_prompts=4, num_generations=4, micro_batch_size=3)
    assert GRPOConfig(num_iterations=2, save_every=4).num_iterations == 2
    with pytest.raises(ValueError, match=r"save_every \(3\) must be a multiple of num_iterations \(2\)"):
        GRPOConfig(num_iterations=2, save_every=3)


@pytest.mark.parametrize("trl,ours", [
    ("grpo", "seq_mean_token_mean"), ("dapo", "token_mean"), ("bnpo", "token_mean"),
    ("dr_grpo", "seq_mean_token_sum_norm"), ("token_mean", "token_mean"),
])
def test_trl_loss_type_names_are_stored_as_ours(trl, ours):
    c = GRPOConfig(loss_type=trl)
    assert c.loss_type == ours
    assert c == GRPOConfig(loss_type=ours)  # one canonical name: one cache key
    assert GRPOConfig.model_validate(c.model_dump()) == c


def test_unknown_loss_type_is_an_error():
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="sum")


def test_trl_cispo_is_token_mean_with_the_cispo_objective():
    c = GRPOConfig(loss_type="cispo", epsilon_high=5.0)
    assert (c.loss_type, c.policy_loss, c.epsilon_high) == ("token_mean", "cispo", 5.0)
    assert c == GRPOConfig(policy_loss="cispo", epsilon_high=5.0)
    with pytest.raises(ValueError, match="must be >= 1"):
        GRPOConfig(loss_type="cispo")  # default epsilon_high 0.28 would cap every weight below 1
    with pytest.raises(ValueError, match="conflicts"):
        GRPOConfig(loss_type="cispo", policy_loss="clip", epsilon_high=5.0)
    d = GRPOConfig()
    assert (d.importance_sampling_level, d.policy_loss, d.use_bias_correction_kl) == ("token", "clip", False)


def test_dr_grpo_keeps_its_constant_when_groups_are_skipped():
    # 2 groups of 2; group 1 is flat (weight 0). Completion lengths 3, 1, 2, 2; max_new_tokens L = 4.
    items = [{"completion_ids": [7] * n, "weight": w} for n, w in [(3, 1.0), (1, 1.0), (2, 0.0), (2, 0.0)]]
    # Dr. GRPO divides by every row (4), not the 2 kept ones; token_mean by the kept tokens 3 + 1 = 4,
    # seq_mean_token_mean by the 2 kept non-empty rows.
    assert global_normalizer(items, "seq_mean_token_sum_norm") == 4.0
    assert global_normalizer(items, "token_mean") == 4.0
    assert global_normalizer(items, "seq_mean_token_mean") == 2.0
    # ratio 1, A = [+1, -1, 0, 0]: per-token loss -A; token sums [-3, +1, 0, 0] -> -2 / (4 rows * L 4) = -0.125
    lp = torch.zeros(4, 4)
    cmask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.0])
    loss_mask = cmask & torch.tensor([True, True, False, False]).unsqueeze(-1)  # skipped rows out of the mask
    loss, _ = grpo_loss(lp, lp, adv, loss_mask, aggregation="seq_mean_token_sum_norm", constant_length=4,
                        normalizer=global_normalizer(items, "seq_mean_token_sum_norm"))
    assert loss.item() == pytest.approx(-0.125)
    # TRL `dr_grpo` (GRPOTrainer._compute_loss), which keeps every row with its advantage 0:
    # (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    trl = ((-adv.unsqueeze(-1) * torch.ones(4, 4)) * cmask).sum() / (4 * 4)
    assert loss.item() == pytest.approx(trl.item())


# ----------------------------------------------------------------------------- batch building


def _fake_rollouts(n_prompts, g):
    return [Rollout(k, s, [1, 5, 6], [7] * (s + 1), "x", [-0.5] * (s + 1), "eos")
            for k in range(n_prompts) for s in range(g)]


def test_make_items_advantages_by_hand():
    cfg = GRPOConfig(num_prompts=2, num_generations=4)
    problems = [{"id": "a", "prompt": "pa", "answer": "1"}, {"id": "b", "prompt": "pb", "answer": "2"}]
    rewards = [1.0, 0.0, None, 0.0, 1.0, 1.0, 1.0, 1.0]  # None: out of the baseline, advantage 0 (TRL)
    items = make_items(_fake_rollouts(2, 4), problems, rewards, [r == 1.0 for r in rewards], cfg)
    # group a, judged [1, 0, 0]: mean 1/3, unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3) = 0.57735,
    # eps 1e-4: A = (2/3) / 0.57745 = 1.15450, (-1/3) / 0.57745 = -0.57725, the None row 0
    s = math.sqrt(1 / 3) + 1e-4
    want = [2 / 3 / s, -1 / 3 / s, 0.0, -1 / 3 / s, 0, 0, 0, 0]
    assert [it["advantage"] for it in items] == pytest.approx(want, abs=1e-6)
    assert [it["prompt_id"] for it in items] == ["a"] * 4 + ["b"] * 4
    assert [it["weight"] for it in items] == [1.0] * 4 + [0.0] * 4  # group b is flat: skipped
    stats = items[0]["stats"]
    assert stats["frac_zero_std"] == 0.5 and stats["frac_unjudged"] == 1 / 8
    # the std of the judged rewards only (TRL's nanstd): [1, 0, 0, 1, 1, 1, 1]
    assert stats["reward_std"] == pytest.approx(torch.tensor([1.0, 0, 0, 1, 1, 1, 1]).std().item())
    kept = make_items(_fake_rollouts(2, 4), problems, rewards, [False] * 8, cfg.model_copy(update={"skip_zero_std_groups": False}))
    assert [it["weight"] for it in kept] == [1.0] * 8


def test_overlong_penalty_and_masked_truncations():
    # one group of 4, max_new_tokens 8, buffer 4: lengths 2, 6, 8, 8 -> penalties 0, (4 - 6) / 4 = -0.5, -1, -1
    cfg = GRPOConfig(num_prompts=1, num_generations=4, max_new_tokens=8, overlong_buffer_len=4,
                     mask_truncated_completions=True)
    problems = [{"id": "a", "prompt": "pa", "answer": "1"}]
    ros = [Rollout(0, s, [1, 5], [7] * n, "x", [-0.5] * n, fr)
           for s, (n, fr) in enumerate([(2, "eos"), (6, "eos"), (8, "length"), (8, "eos")])]
    items = make_items(ros, problems, [1.0, 1.0, 1.0, None], [True] * 4, cfg)
    # judged rewards 1 + [0, -0.5, -1] = [1, 0.5, 0]; the None row stays unjudged
    assert [it["reward"] for it in items] == [1.0, 0.5, 0.0, None]
    # mean 0.5, unbiased std sqrt((0.25 + 0 + 0.25) / 2) = 0.5 -> A = [0.5, 0, -0.5] / 0.5001, None -> 0
    assert [it["advantage"] for it in items] == pytest.approx([0.5 / 0.5001, 0.0, -0.5 / 0.5001, 0.0], abs=1e-6)
    # the truncated row (finish_reason 'length') took part in the baseline but is out of the loss
    assert [it["weight"] for it in items] == [1.0, 1.0, 0.0, 1.0]
    off = make_items(ros, problems, [1.0, 1.0, 1.0, None], [True] * 4, GRPOConfig(num_prompts=1, num_generations=4))
    assert [it["reward"] for it in off] == [1.0, 1.0, 1.0, None] and all(it["weight"] == 0.0 for it in off)
    with pytest.raises(ValueError, match="overlong_buffer_len"):
        GRPOConfig(max_new_tokens=8, overlong_buffer_len=8)


def test_global_batch_is_group_contiguous_and_deterministic(base):
    model, tok = load_policy(base["base_path"])
    problems = load_problems(base["prompts_path"])
    cfg = GRPOConfig(**small_config())
    gb = make_global_batch(model, tok, problems, cfg)
    b0, b0_again, b1 = gb(0), gb(0), gb(1)
    assert len(b0) == cfg.batch_size
    picked = [problems[i]["id"] for i in EpochSampler(len(problems), cfg.seed).indices(0, cfg.num_prompts)]
    assert [it["prompt_id"] for it in b0] == [pid for pid in picked for _ in range(cfg.num_generations)]
    for k in range(cfg.num_prompts):
        group = b0[k * 4 : (k + 1) * 4]
        assert len({tuple(it["prompt_ids"]) for it in group}) == 1
        assert sum(it["advantage"] for it in group) == pytest.approx(0.0, abs=1e-5)
    strip = lambda b: [(it["completion_ids"], it["reward"], it["advantage"]) for it in b]  # noqa: E731
    assert strip(b0) == strip(b0_again)
    assert strip(b0) != strip(b1)
    assert {it["reward"] for it in b0} == {0.0, 1.0}, "the fixture base should give mixed rewards"
    assert model.training  # sampling put it in eval mode; the batch builder restores train mode


def test_num_iterations_reuses_each_rollout_batch(base):
    model, tok = load_policy(base["base_path"])
    problems = load_problems(base["prompts_path"])
    cfg = GRPOConfig(**small_config(num_iterations=2, save_every=2))
    gb = make_global_batch(model, tok, problems, cfg)
    b0 = gb(0)
    assert gb(1) is b0  # steps 0 and 1 train on the batch sampled at step 0
    b2 = gb(2)
    assert b2 is not b0 and gb(3) is b2
    # prompts advance once per batch: batch 2 takes the sampler's second slice, not its third
    second = [problems[i]["id"] for i in EpochSampler(len(problems), cfg.seed).indices(cfg.num_prompts, cfg.num_prompts)]
    assert [it["prompt_id"] for it in b2][:: cfg.num_generations] == second
    # the same seed as μ = 1 at step 0 (the first batch is the same rollouts)
    one = make_global_batch(model, tok, problems, GRPOConfig(**small_config()))(0)
    assert [it["completion_ids"] for it in one] == [it["completion_ids"] for it in b0]
    with pytest.raises(RuntimeError, match="never sampled"):
        make_global_batch(model, tok, problems, cfg)(1)


def test_num_iterations_takes_the_ratio_against_the_behaviour_logprobs(base):
    model, tok = load_policy(base["base_path"])
    cfg = GRPOConfig(**small_config(num_iterations=2, save_every=2))
    batch = make_global_batch(model, tok, load_problems(base["prompts_path"]), cfg)(0)
    # Pretend the policy has doubled every sampled token's probability since sampling:
    # old = behaviour - ln 2, so the ratio is 2 (times exp(gap), gap < 1e-4) on every token.
    moved = [dict(it, behaviour_logprobs=[x - math.log(2) for x in it["behaviour_logprobs"]]) for it in batch]
    ctx = StepContext(1, 0, 0, 1, 1, moved, 1.0)
    _, m = grpo_step_fn(cfg, tok.pad_token_id)(model, moved, ctx)
    # token_mean: per token min(r A, clip(r, 0.8, 1.28) A) = 1.28 A for A > 0 (clipped), 2 A for A < 0,
    # so loss = -Σ_i w_i len_i (A_i > 0 ? 1.28 : 2) A_i / Σ_i w_i len_i
    lens = [len(it["completion_ids"]) for it in batch]
    w = [it["weight"] for it in batch]
    adv = [it["advantage"] for it in batch]
    n = sum(wi * li for wi, li in zip(w, lens))
    want = -sum(wi * li * (1.28 if a > 0 else 2.0) * a for wi, li, a in zip(w, lens, adv)) / n
    assert m["loss"] == pytest.approx(want, rel=1e-3)
    # clip_fraction: the share of kept tokens where the clipped term is taken (A > 0; for A < 0 the
    # unclipped 2 A is the smaller and keeps its gradient)
    bites = sum(wi * li for wi, li, a in zip(w, lens, adv) if a > 0) / n
    assert 0 < bites < 1
    assert m["clip_fraction"] == pytest.approx(bites, abs=1e-6)
    assert m["logprob_gap"] == pytest.approx(math.log(2), abs=1e-4)
    # μ = 1 ignores the behaviour log-probs (ratio 1) whatever they are
    _, m1 = grpo_step_fn(GRPOConfig(**small_config()), tok.pad_token_id)(model, moved, ctx)
    assert m1["clip_fraction"] == 0.0
    assert m1["loss"] == pytest.approx(-sum(wi * li * a for wi, li, a in zip(w, lens, adv)) / n, abs=1e-6)


@pytest.mark.parametrize("loss_type", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_micro_batches_sum_to_the_global_loss(base, loss_type):
    model, tok = load_policy(base["base_path"])
    cfg = GRPOConfig(**small_config(loss_type=loss_type))
    batch = make_global_batch(model, tok, load_problems(base["prompts_path"]), cfg)(0)
    step = grpo_step_fn(cfg, tok.pad_token_id)

    g_full, m_full = accumulated_grads(model, step, batch, 16)
    g_split, m_split = accumulated_grads(model, step, batch, 4)
    for a, b in zip(g_full, g_split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # padding changes fp32 rounding
    assert m_full == pytest.approx(m_split, rel=1e-5, abs=1e-7)
    assert set(m_full) == METRIC_KEYS
    # μ = 1: ratio 1, so the loss is -Σ_i w_i A_i c_i / N with c_i the row's token sum of 1
    # (token_mean: c_i = len_i, N = Σ w_i len_i; seq_mean_token_mean: c_i = 1, N = Σ w_i;
    # sum_norm: c_i = len_i / max_new_tokens, N = 16, every row: Dr. GRPO's constant).
    lens = [len(it["completion_ids"]) for it in batch]
    w = [it["weight"] for it in batch]
    adv = [it["advantage"] for it in batch]
    c = {"token_mean": lens, "seq_mean_token_mean": [1] * 16, "seq_mean_token_sum_norm": [x / 24 for x in lens]}[loss_type]
    n = {"token_mean": sum(wi * li for wi, li in zip(w, lens)), "seq_mean_token_mean": sum(w),
         "seq_mean_token_sum_norm": 16}[loss_type]
    assert m_full["loss"] == pytest.approx(-sum(wi * ai * ci for wi, ai, ci in zip(w, adv, c)) / max(n, 1), abs=1e-6)
    assert m_full["reward_mean"] == pytest.approx(sum(it["reward"] for it in batch) / 16)
    assert m_full["logprob_gap"] < 1e-4  # trainer log-probs = the sampler's behaviour log-probs


def test_kl_term_with_a_reference_model(base):
    import copy

    model, tok = load_policy(base["base_path"])
    cfg0 = GRPOConfig(**small_config())
    batch = make_global_batch(model, tok, load_problems(base["prompts_path"]), cfg0)(0)
    ctx = StepContext(0, 0, 0, 1, 1, batch, 1.0)
    ref = copy.deepcopy(model).eval().requires_grad_(False)
    _, same = grpo_step_fn(cfg0.model_copy(update={"beta": 0.1}), tok.pad_token_id, ref)(model, batch, ctx)
    assert same["kl"] == pytest.approx(0.0, abs=1e-6)  # reference = policy: k3 = 0
    with torch.no_grad():
        ref.model.embed_tokens.weight.add_(0.05 * torch.randn_like(ref.model.embed_tokens.weight))
    _, m0 = grpo_step_fn(cfg0, tok.pad_token_id)(model, batch, ctx)
    _, mb = grpo_step_fn(cfg0.model_copy(update={"beta": 0.1}), tok.pad_token_id, ref)(model, batch, ctx)
    assert m0["kl"] == 0.0
    # k3 (Schulman 2020) by hand: d = log pi_ref - log pi; kl = mean over kept tokens of e^d - d - 1
    from models.recipes.grpo import collate_rollouts, completion_logprobs

    with torch.no_grad():
        cb = collate_rollouts(batch, tok.pad_token_id)
        kept = cb["completion_mask"] & (cb["weights"] > 0).unsqueeze(-1)
        d = (completion_logprobs(ref, cb, cfg0.temperature)[0] - completion_logprobs(model, cb, cfg0.temperature)[0])[kept]
    assert mb["kl"] == pytest.approx((d.exp() - d - 1).mean().item(), rel=1e-5) and mb["kl"] > 0
    # token_mean over one chunk = the whole batch: loss_beta = loss_0 + beta * (mean k3 over kept tokens)
    assert mb["loss"] == pytest.approx(m0["loss"] + 0.1 * mb["kl"], rel=1e-5, abs=1e-7)


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def straight_run(base):
    workdir = base["root"] / "straight"
    result = run_training(TARGET, spec_for(base, workdir), 1, workdir)
    return workdir, result


def test_train_writes_metrics_rollouts_and_hf_output(straight_run):
    from transformers import AutoModelForCausalLM

    workdir, result = straight_run
    assert result["final_step"] == 4 and result["resumed_from_step"] is None
    metrics = read_metrics(result["metrics_path"])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert METRIC_KEYS <= set(m) and all(math.isfinite(m[k]) for k in METRIC_KEYS)
        assert 0 <= m["accuracy"] <= 1 and 0 <= m["frac_zero_std"] <= 1
    assert any(m["loss"] != 0 for m in metrics)
    rows = [json.loads(ln) for ln in open(result["rollouts_path"])]
    assert [r["step"] for r in rows] == [s for s in (1, 2, 3, 4) for _ in range(8)]  # 2 prompts × G 4
    assert {"prompt_id", "prompt", "completion", "reward", "advantage", "length"} <= set(rows[0])
    model = AutoModelForCausalLM.from_pretrained(result["output_dir"])
    assert model.config.hidden_size == 32


def test_resume_regenerates_the_same_rollouts_and_weights(base, straight_run):
    straight_dir, straight = straight_run
    workdir = base["root"] / "resumed"
    first = run_training(TARGET, spec_for(base, workdir, max_steps=2), 1, workdir)
    assert first["final_step"] == 2
    shutil.rmtree(workdir / "output")
    again = run_training(TARGET, spec_for(base, workdir, max_steps=4), 1, workdir)
    assert again["resumed_from_step"] == 2 and again["final_step"] == 4
    assert_same_weights(straight["output_dir"], again["output_dir"])
    assert open(straight["rollouts_path"]).read() == open(again["rollouts_path"]).read()
    ma, mb = read_metrics(straight["metrics_path"]), read_metrics(again["metrics_path"])
    assert [m["step"] for m in mb] == [1, 2, 3, 4]  # the resumed run's lines continue the first run's
    for x, y in zip(ma, mb):
        x.pop("step_seconds"), y.pop("step_seconds")
        assert y == pytest.approx(x, rel=1e-6, abs=1e-9)


def test_num_iterations_resumes_on_a_batch_boundary(base):
    """μ = 2: the clip bites on the second update of each batch, rollouts are logged per batch, and a
    run stopped at step 2 and resumed to 4 ends with the weights of one straight run."""
    straight_dir = base["root"] / "mu2_straight"
    straight = run_training(TARGET, spec_for(base, straight_dir, num_iterations=2, save_every=2), 1, straight_dir)
    metrics = read_metrics(straight["metrics_path"])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    assert metrics[0]["clip_fraction"] == 0.0 and metrics[1]["clip_fraction"] > 0  # lr 1e-3 moved it
    assert metrics[1]["accuracy"] == metrics[0]["accuracy"]  # the same batch
    rows = [json.loads(ln) for ln in open(straight["rollouts_path"])]
    assert [r["step"] for r in rows] == [s for s in (1, 3) for _ in range(8)]  # one sample per batch
    workdir = base["root"] / "mu2_resumed"
    first = run_training(TARGET, spec_for(base, workdir, max_steps=2, num_iterations=2, save_every=2), 1, workdir)
    shutil.rmtree(workdir / "output")
    again = run_training(TARGET, spec_for(base, workdir, num_iterations=2, save_every=2), 1, workdir)
    assert first["final_step"] == 2 and again["resumed_from_step"] == 2
    assert_same_weights(straight["output_dir"], again["output_dir"])
    assert open(straight["rollouts_path"]).read() == open(again["rollouts_path"]).read()


@pytest.mark.slow
def test_zero3_two_ranks_match_zero0_one_rank(base):
    one = base["root"] / "zero0_1rank"
    two = base["root"] / "zero3_2rank"
    r1 = run_training(TARGET, spec_for(base, one, max_steps=2), 1, one)
    r2 = run_training(TARGET, spec_for(base, two, max_steps=2, deepspeed="zero3.json", world_size=2), 2, two)
    m1, m2 = read_metrics(r1["metrics_path"]), read_metrics(r2["metrics_path"])
    assert m2[0]["loss"] == pytest.approx(m1[0]["loss"], rel=1e-4, abs=1e-7)
    for key in ("reward_mean", "reward_std", "completion_length", "frac_zero_std", "entropy"):
        assert m2[0][key] == pytest.approx(m1[0][key], rel=1e-4, abs=1e-7), key
    # Step 2 samples from the updated ZeRO-3 weights (gathered into the sampling copy): same rollouts.
    rows = lambda r: [json.loads(ln) for ln in open(r["rollouts_path"])]  # noqa: E731
    assert [x["completion"] for x in rows(r2)] == [x["completion"] for x in rows(r1)]
    a, _ = load_policy(r1["output_dir"])
    b, _ = load_policy(r2["output_dir"])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("mixed", ["all", "none", "not_first"])
def test_dynamic_sampling_refills_the_batch_with_groups_whose_rewards_differ(monkeypatch, mixed):
    """DAPO's dynamic sampling against a slow oracle: canned samples make a problem's group either
    all correct (rewards agree: no signal) or half correct; the batch keeps the first num_prompts
    groups that differ, drawing extra prompts from the refill stream round by round."""
    import models.recipes.grpo as G
    from models.modeling.chat import encode_prompt
    from models.modeling.tokenizer import build_tokenizer

    tok = build_tokenizer()
    problems = [{"id": f"p{i}", "prompt": f"Q: {i}+0\nA:", "answer": str(i)} for i in range(8)]
    by_ids = {tuple(encode_prompt(tok, p["prompt"], None)): p for p in problems}
    cfg = GRPOConfig(num_prompts=2, num_generations=2, dynamic_sampling=True, max_sampling_rounds=3,
                     rewards={"builtin_task": 1.0}, seed=3)
    first = [problems[i]["id"] for i in EpochSampler(8, cfg.seed).indices(0, 2)]
    is_mixed = {"all": lambda pid: True, "none": lambda pid: False,
                "not_first": lambda pid: pid not in first}[mixed]
    seeds = []

    def fake_sample(model, tok_, prompts, n, params, *, seed, batch_size):
        seeds.append(seed)
        out = []
        for k, ids in enumerate(prompts):
            p = by_ids[tuple(ids)]
            for s in range(n):
                right = s % 2 == 0 or not is_mixed(p["id"])
                text = f"<think>{p['answer']}+0={p['answer']}</think><answer>{p['answer'] if right else 99}</answer>"
                out.append(Rollout(k, s, list(ids), [1, 2], text, [-0.5, -0.5], "stop"))
        return out

    monkeypatch.setattr(G, "sample", fake_sample)
    items = G.make_global_batch(torch.nn.Linear(1, 1), tok, problems, cfg)(0)

    # the oracle: round 0 draws the sampler's prompts, round r >= 1 the refill stream's next two
    refill = EpochSampler(8, G.refill_seed(cfg.seed, 0, 0))
    drawn, rounds = list(first), 1
    while sum(is_mixed(pid) for pid in drawn) < 2 and rounds < 3:
        drawn += [problems[i]["id"] for i in refill.indices((rounds - 1) * 2, 2)]
        rounds += 1
    keep = ([pid for pid in drawn if is_mixed(pid)][:2] + [pid for pid in drawn if not is_mixed(pid)])[:2]
    assert [it["prompt_id"] for it in items] == [pid for pid in keep for _ in range(2)]
    assert seeds == [G.rollout_seed(cfg.seed, 0)] + [G.refill_seed(cfg.seed, 0, r) for r in range(1, rounds)]
    assert items[0]["stats"]["sampling_rounds"] == rounds
    assert {"all": 1, "none": 3}.get(mixed, rounds) == rounds
    for it in items:  # agreeing groups fill the batch at weight 0 with advantage 0
        assert it["weight"] == (1.0 if is_mixed(it["prompt_id"]) else 0.0)
        if not is_mixed(it["prompt_id"]):
            assert it["advantage"] == 0.0
