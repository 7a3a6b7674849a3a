"""PPO recipe: config validation, the per-token targets by hand, the global batch builder, the loss
split over micro-batches, a short training run with its HF + value-head output, and exact resume."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path(__file__).resolve().parents[1] / ".posttrain" / "torch_extensions"))

from helpers import accumulated_grads, build_half_solved_base, rl_spec  # noqa: E402
from models.training.engine import StepContext, read_metrics  # noqa: E402
from models.modeling.heads import CausalLMWithValueHead  # noqa: E402
from models.training.launch import run_training  # noqa: E402
from models.recipes.ppo_config import PPOConfig  # noqa: E402
from models.recipes.grpo import load_problems  # noqa: E402
from models.recipes.ppo import VALUE_HEAD_FILE, make_global_batch, ppo_step_fn, ppo_targets  # noqa: E402

TARGET = "models.recipes.ppo:train_ppo"
METRIC_KEYS = {
    "loss", "pg_loss", "vf_loss", "clip_fraction", "approx_kl", "vf_clip_fraction", "value_mean", "entropy",
    "kl", "reward_mean", "score_mean", "accuracy", "completion_length", "frac_truncated", "logprob_gap",
    "advantage_std", "explained_variance", "frac_unjudged",
    "clip_low", "clip_high", "length_correct", "length_incorrect", "format_rate", "marker/step_by_step",
    "marker/self_check",
}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from a second thread, and on a busy 2-core machine two threads
    per process thrash (measured: 150 SFT steps take 3.7 s on 1 thread, 183 s on 2 under load 8)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny base that half-solves 2-3 operand chains (150 full-batch SFT steps, ~2 s), so the
    verifier's scores are mixed (see helpers.build_half_solved_base)."""
    return build_half_solved_base(tmp_path_factory.mktemp("ppo_base"))


def small_config(**kw) -> dict:
    cfg = dict(num_prompts=4, num_generations=4, max_new_tokens=24, max_steps=4, micro_batch_size=8,
               save_every=1, lr=1e-3, seed=3, num_threads=1)
    cfg.update(kw)
    return cfg


def spec_for(base, workdir, **kw) -> dict:
    return rl_spec(base, workdir, small_config(**kw))


def load_parts(base):
    """(policy with a value head seeded like train_ppo's, tokenizer, reference = a perturbed copy)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base["base_path"])
    torch.manual_seed(0)
    model = CausalLMWithValueHead(AutoModelForCausalLM.from_pretrained(base["base_path"], dtype=torch.float32))
    ref = copy.deepcopy(model.pretrained_model).eval().requires_grad_(False)
    with torch.no_grad():  # a reference that differs from the policy, so that KL != 0
        ref.model.embed_tokens.weight.add_(0.05 * torch.randn_like(ref.model.embed_tokens.weight))
    return model, tok, ref


# ----------------------------------------------------------------------------- config and targets


def test_config_derives_batch_and_validates():
    c = PPOConfig(num_prompts=4, num_generations=2)
    assert (c.batch_size, c.micro_batch_size, c.grad_accum) == (8, 8, 1)
    assert PPOConfig.model_validate(c.model_dump()) == c
    d = PPOConfig()
    assert (d.batch_size, d.kl_coef, d.lam, d.vf_coef, d.cliprange, d.ppo_epochs) == (64, 0.05, 0.95, 0.1, 0.2, 1)
    with pytest.raises(ValueError, match=r"num_prompts × num_generations \(4 × 2 = 8\)"):
        PPOConfig(num_prompts=4, num_generations=2, batch_size=16)
    assert PPOConfig(rewards={}).rewards == {}  # a reward model may come from the spec (train_ppo checks)
    with pytest.raises(ValueError, match="must divide max_steps"):
        PPOConfig(ppo_epochs=4, max_steps=10, save_every=4)
    with pytest.raises(ValueError, match="unknown reward"):
        PPOConfig(rewards={"nope": 1.0})
    with pytest.raises(ValueError, match="extra_forbidden|Extra inputs"):
        PPOConfig(kl_cof=0.1)


def test_ppo_targets_by_hand():
    cfg = PPOConfig(kl_coef=0.1, gamma=1.0, lam=0.95, whiten_advantages=False)
    scores = torch.tensor([1.0, 0.0])
    lp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -2.0, 0.0], [-0.5, -0.5, -1.0]])
    values = torch.tensor([[0.5, 0.2, 9.0], [0.0, 0.0, 0.0]])
    mask = torch.tensor([[True, True, False], [True, True, True]])
    t = ppo_targets(scores, lp, ref, values, mask, cfg)
    # row 0: k1 = lp - ref = [0.5, 0]; r = [-0.1·0.5, -0.1·0 + 1] = [-0.05, 1.0], 0 at padding
    # row 1: k1 = [0, 0, 0.5]; r = [0, 0, -0.05 + score 0]
    torch.testing.assert_close(t["rewards"], torch.tensor([[-0.05, 1.0, 0.0], [0.0, 0.0, -0.05]]))
    # row 0 GAE: A_1 = 1.0 + 0 - 0.2 = 0.8; A_0 = (-0.05 + 0.2 - 0.5) + 0.95·0.8 = -0.35 + 0.76 = 0.41
    # row 1 (V = 0): A_2 = -0.05, A_1 = 0 + 0.95·(-0.05) = -0.0475, A_0 = 0.95·(-0.0475) = -0.045125
    want = torch.tensor([[0.41, 0.8, 0.0], [-0.045125, -0.0475, -0.05]])
    torch.testing.assert_close(t["advantages"], want)
    # returns = A + V: [0.91, 1.0]; row 1 = A
    torch.testing.assert_close(t["returns"], torch.tensor([[0.91, 1.0, 0.0], [-0.045125, -0.0475, -0.05]]))
    w = ppo_targets(scores, lp, ref, values, mask, cfg.model_copy(update={"whiten_advantages": True}))
    valid = w["advantages"][mask]
    assert float(valid.mean()) == pytest.approx(0.0, abs=1e-6)
    assert float(valid.std()) == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(w["returns"], t["returns"])  # value targets are never whitened
    assert float(w["advantages"][0, 2]) == 0.0


# ----------------------------------------------------------------------------- batch building


def fake_scorer(prompts, completions):
    return [0.01 * len(c) for c in completions]


def test_global_batch_rewards_whitening_and_determinism(base):
    model, tok, ref = load_parts(base)
    problems = load_problems(base["prompts_path"])
    cfg = PPOConfig(**small_config(kl_coef=0.1, reward_model="fake", reward_model_weight=0.5))
    gb = make_global_batch(model, tok, problems, cfg, ref_model=ref, reward_scorer=fake_scorer)
    b0, b1 = gb(0), gb(1)
    assert len(b0) == cfg.batch_size
    assert model.training  # sampling put it in eval mode; the builder restores train mode
    # one row by hand: r_j = -kl_coef·(old_j - ref_j), plus the score at the last token
    it = b0[5]
    c = len(it["completion_ids"])
    want = [-0.1 * (a - b) for a, b in zip(it["old_logprobs"], it["ref_logprobs"])]
    want[-1] += it["score"]
    assert it["rewards"] == pytest.approx(want, abs=1e-6)
    assert len(it["advantages"]) == len(it["returns"]) == len(it["old_values"]) == c
    assert it["kl"] == pytest.approx(sum(a - b for a, b in zip(it["old_logprobs"], it["ref_logprobs"])), abs=1e-5)
    assert any(abs(x["kl"]) > 1e-3 for x in b0)
    # score = verifier (builtin_task, 0/1) + 0.5 · fake reward model
    for x in b0:
        verifier = x["score"] - 0.5 * 0.01 * len(x["completion_text"])
        assert verifier == pytest.approx(1.0 if x["correct"] else 0.0, abs=1e-9)
    assert {x["correct"] for x in b0} == {False, True}, "the fixture base should give mixed scores"
    # the reward model's agreement with the verifier, recounted from the rows: over (correct,
    # incorrect) completions of one prompt, how often the longer-is-better fake scorer ranks right
    won = pairs = 0
    for a in b0:
        for b in b0:
            if a["prompt_id"] == b["prompt_id"] and a["correct"] and not b["correct"]:
                la, lb = len(a["completion_text"]), len(b["completion_text"])
                won, pairs = won + (1.0 if la > lb else 0.5 if la == lb else 0.0), pairs + 1
    stats = b0[0]["stats"]
    assert pairs > 0 and stats["rm_verifier_agreement"] == pytest.approx(won / pairs)
    assert stats["rm_score_mean"] == pytest.approx(sum(0.01 * len(x["completion_text"]) for x in b0) / len(b0))
    # the old log-probs are those the sampler drew with (same weights, T = 1, top_p = 1)
    assert max(abs(a - b) for x in b0 for a, b in zip(x["old_logprobs"], x["behaviour_logprobs"])) < 1e-4
    # advantages whitened over every completion token of the global batch
    adv = torch.tensor([a for x in b0 for a in x["advantages"]])
    assert float(adv.mean()) == pytest.approx(0.0, abs=1e-5) and float(adv.std()) == pytest.approx(1.0, abs=1e-4)
    # a pure function of (weights, step): a fresh builder regenerates step 0 exactly
    again = make_global_batch(model, tok, problems, cfg, ref_model=ref, reward_scorer=fake_scorer)(0)
    strip = lambda b: [(x["completion_ids"], x["score"], x["advantages"], x["returns"]) for x in b]  # noqa: E731
    assert strip(again) == strip(b0)
    assert strip(b1) != strip(b0)


def test_ppo_epochs_reuse_the_rollouts(base):
    model, tok, _ = load_parts(base)
    problems = load_problems(base["prompts_path"])
    cfg = PPOConfig(**small_config(ppo_epochs=2, max_steps=4, save_every=2, num_prompts=2, num_generations=2,
                                   micro_batch_size=4, kl_coef=0.0))
    gb = make_global_batch(model, tok, problems, cfg)
    b0 = gb(0)
    assert gb(1) is b0  # epoch 2 of rollout batch 0
    b2 = gb(2)
    assert [x["completion_ids"] for x in b2] != [x["completion_ids"] for x in b0]
    with pytest.raises(RuntimeError, match="not in memory"):
        make_global_batch(model, tok, problems, cfg)(3)


def test_micro_batches_sum_to_the_global_loss(base):
    model, tok, ref = load_parts(base)
    cfg = PPOConfig(**small_config(kl_coef=0.1))
    batch = make_global_batch(model, tok, load_problems(base["prompts_path"]), cfg, ref_model=ref)(0)
    step = ppo_step_fn(cfg, tok.pad_token_id)

    g_full, m_full = accumulated_grads(model, step, batch, 16)
    g_split, m_split = accumulated_grads(model, step, batch, 4)
    for a, b in zip(g_full, g_split):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)  # padding changes fp32 rounding
    assert m_full == pytest.approx(m_split, rel=1e-5, abs=1e-6)
    assert set(m_full) == METRIC_KEYS
    assert model.value_head.linear.weight.grad.abs().sum() > 0  # the critic is trained too
    # first update: ratio 1 and V = old V, so pg = -Σ A / N and vf = 0.5 Σ (old V - R)² / N, N tokens
    n = sum(len(x["completion_ids"]) for x in batch)
    pg = -sum(a for x in batch for a in x["advantages"]) / n
    vf = 0.5 * sum((v - r) ** 2 for x in batch for v, r in zip(x["old_values"], x["returns"])) / n
    assert m_full["pg_loss"] == pytest.approx(pg, abs=1e-5)
    assert m_full["vf_loss"] == pytest.approx(vf, rel=1e-4)
    assert m_full["loss"] == pytest.approx(pg + 0.1 * vf, rel=1e-4, abs=1e-6)
    assert m_full["clip_fraction"] == 0.0 and m_full["vf_clip_fraction"] == 0.0


def test_critic_warmup_trains_the_value_loss_alone(base):
    model, tok, ref = load_parts(base)
    cfg = PPOConfig(**small_config(kl_coef=0.1, critic_warmup=2))
    batch = make_global_batch(model, tok, load_problems(base["prompts_path"]), cfg, ref_model=ref)(0)
    step = ppo_step_fn(cfg, tok.pad_token_id)
    n = sum(len(x["completion_ids"]) for x in batch)
    pg = -sum(a for x in batch for a in x["advantages"]) / n  # first update: ratio 1
    vf = 0.5 * sum((v - r) ** 2 for x in batch for v, r in zip(x["old_values"], x["returns"])) / n
    for s, want in ((0, 0.1 * vf), (1, 0.1 * vf), (2, pg + 0.1 * vf)):  # steps 0 and 1 warm the critic
        loss, m = step(model, batch, StepContext(s, 0, 0, 1, 1, batch, 1.0))
        assert float(loss.detach()) == pytest.approx(want, rel=1e-4, abs=1e-6), s
        assert m["pg_loss"] == pytest.approx(pg, abs=1e-5)  # still reported during the warm-up


def test_zero_value_head_starts_the_critic_at_zero(base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = CausalLMWithValueHead(AutoModelForCausalLM.from_pretrained(base["base_path"]), "zeros")
    tok = AutoTokenizer.from_pretrained(base["base_path"])
    cfg = PPOConfig(**small_config(kl_coef=0.0, value_head_init="zeros", whiten_advantages=False))
    batch = make_global_batch(model, tok, load_problems(base["prompts_path"]), cfg)(0)
    assert all(v == 0.0 for x in batch for v in x["old_values"])
    # V = 0, no KL, gamma 1: GAE A_t = lam^(T-1-t) * score, so the last token carries the full score
    for x in batch:
        t = len(x["advantages"])
        want = [cfg.lam ** (t - 1 - j) * x["score"] for j in range(t)]
        assert x["advantages"] == pytest.approx(want, abs=1e-6)
    with pytest.raises(ValueError):
        PPOConfig(value_head_init="xavier")


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def straight_run(base):
    workdir = base["root"] / "straight"
    return run_training(TARGET, spec_for(base, workdir), 1, workdir)


def test_train_writes_metrics_rollouts_and_outputs(straight_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = straight_run
    assert result["final_step"] == 4 and result["resumed_from_step"] is None
    metrics = read_metrics(result["metrics_path"])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m in metrics:
        assert METRIC_KEYS <= set(m) and all(math.isfinite(m[k]) for k in METRIC_KEYS)
        assert 0 <= m["accuracy"] <= 1 and m["logprob_gap"] < 1e-4
    rows = [json.loads(ln) for ln in open(result["rollouts_path"])]
    assert [r["step"] for r in rows] == [s for s in (1, 2, 3, 4) for _ in range(8)]  # 2 prompts × 4
    out = Path(result["output_dir"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.hidden_size == 32
    head = load_file(str(out / VALUE_HEAD_FILE))
    assert head["linear.weight"].shape == (1, 32) and head["linear.bias"].shape == (1,)


def test_resume_regenerates_the_same_rollouts_and_weights(base, straight_run):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    workdir = base["root"] / "resumed"
    first = run_training(TARGET, spec_for(base, workdir, max_steps=2), 1, workdir)
    assert first["final_step"] == 2
    shutil.rmtree(workdir / "output")
    again = run_training(TARGET, spec_for(base, workdir, max_steps=4), 1, workdir)
    assert again["resumed_from_step"] == 2 and again["final_step"] == 4
    a = AutoModelForCausalLM.from_pretrained(straight_run["output_dir"])
    b = AutoModelForCausalLM.from_pretrained(again["output_dir"])
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)
    ha = load_file(str(Path(straight_run["output_dir"]) / VALUE_HEAD_FILE))
    hb = load_file(str(Path(again["output_dir"]) / VALUE_HEAD_FILE))
    for k in ha:
        torch.testing.assert_close(ha[k], hb[k], rtol=0, atol=1e-6, msg=k)
    assert open(straight_run["rollouts_path"]).read() == open(again["rollouts_path"]).read()
    ma, mb = read_metrics(straight_run["metrics_path"]), read_metrics(again["metrics_path"])
    for x, y in zip(ma, mb):
        x.pop("step_seconds"), y.pop("step_seconds")
        assert y == pytest.approx(x, rel=1e-6, abs=1e-9)


def test_train_refuses_without_any_score(base, tmp_path):
    with pytest.raises(ValueError, match="nothing would score"):
        run_training(TARGET, spec_for(base, tmp_path / "w", rewards={}), 1, tmp_path / "w")


def test_ppo_epochs_and_value_lr_multiplier_train(base, monkeypatch):
    optimizers = []

    class RecordingAdamW(torch.optim.AdamW):  # the optimizer run_loop builds, kept for its param groups
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            optimizers.append(self)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    workdir = base["root"] / "epochs"
    res = run_training(TARGET, spec_for(base, workdir, max_steps=4, save_every=2, ppo_epochs=2,
                                        value_lr_multiplier=10.0), 1, workdir)
    # two groups: the policy at lr 1e-3, the value head at 1e-3 * 10 = 1e-2 (before the schedule scales both)
    (opt,) = optimizers
    policy, head = opt.param_groups
    assert policy["initial_lr"] == pytest.approx(1e-3) and head["initial_lr"] == pytest.approx(1e-2)
    assert head["lr"] == pytest.approx(10 * policy["lr"])
    assert [p.shape[0] for p in head["params"]] == [1, 1]  # the value head: Linear(hidden, 1) weight and bias
    metrics = read_metrics(res["metrics_path"])
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    # epochs 1 and 2 of a batch see the same rollouts; the second starts off-policy (ratio != 1)
    assert metrics[0]["score_mean"] == metrics[1]["score_mean"]
    assert metrics[0]["approx_kl"] == pytest.approx(0.0, abs=1e-7) and metrics[1]["approx_kl"] > 0
    rows = [json.loads(ln) for ln in open(res["rollouts_path"])]
    assert sorted({r["step"] for r in rows}) == [1, 3]
