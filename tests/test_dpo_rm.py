"""DPO and reward-model recipes: on-policy pair building, the first DPO/IPO loss by hand, learning on
the training pairs, reference log-probs computed once, micro-batching = one batch, exact resume, and
the reward model's output directory round-tripping through load_reward_scorer."""

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

import models.recipes.dpo as dpo_mod  # noqa: E402
from helpers import off_by_one_pairs  # noqa: E402
from models.data.builtin_task import make_problems  # noqa: E402
from models.recipes.preference_config import DPOConfig, RewardModelConfig  # noqa: E402
import models.data.preference_pairs as pairs_mod  # noqa: E402
from models.data.preference_pairs import build_onpolicy_pairs, collate_sequences, encode_sequence  # noqa: E402
from models.recipes.dpo import train_dpo  # noqa: E402
from models.recipes.reward_model import load_reward_scorer, train_reward_model  # noqa: E402
from models.generation.rollouts import Rollout, SamplingParams  # noqa: E402
from models.modeling.tokenizer import build_tokenizer  # noqa: E402

LN2 = math.log(2.0)


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def pref_file(tmp_path_factory) -> Path:
    """8 hand-made pairs: the worked solution vs the same solution with the answer off by one."""
    rows = [{"prompt": "Q: 1+2\nA:", "chosen": "<think>1+2=3</think><answer>3</answer>",
             "rejected": "<think>1+2=3</think><answer>4</answer>"}]
    rows += off_by_one_pairs(make_problems(0, 7, 1, 2, 3)[0])
    out = tmp_path_factory.mktemp("prefs") / "pairs.jsonl"
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out


def _pref_spec(config_cls, base, data, workdir, **over) -> dict:
    cfg = dict(dataset="file", max_steps=2, batch_size=8, micro_batch_size=8, lr=1e-3, save_every=1,
               lr_schedule="constant", max_seq_len=64)
    cfg.update(over)
    return {"config": config_cls(**cfg).model_dump(), "base_path": str(base), "dataset_path": str(data),
            "workdir": str(workdir)}


def dpo_spec(base, data, workdir, **over) -> dict:
    return _pref_spec(DPOConfig, base, data, workdir, **over)


def rm_spec(base, data, workdir, **over) -> dict:
    return _pref_spec(RewardModelConfig, base, data, workdir, **over)


def _weights(path):
    from safetensors.torch import load_file

    return load_file(f"{path}/model.safetensors")


# ----------------------------------------------------------------------------- pairs


def test_pair_builder_pairs_first_correct_with_first_incorrect(monkeypatch):
    """Canned samples: the split follows the verifier; None is neither; one-sided prompts give no pair."""
    canned = {
        "p0": ["wrong", "right", "?", "right2"],  # correct 'right', incorrect 'wrong'
        "p1": ["right", "right", "right", "?"],   # no incorrect sample: no pair
        "p2": ["?", "?", "nope", "right"],        # unjudged skipped: ('right', 'nope')
    }

    def fake_sample(model, tok, prompts, n, params, *, seed, batch_size):  # prompts: ids, as encode_prompt gives
        texts = [tok.decode(p, skip_special_tokens=True) for p in prompts]
        return [Rollout(i, s, [], [], canned[p][s], [], "stop") for i, p in enumerate(texts) for s in range(n)]

    monkeypatch.setattr(pairs_mod, "sample", fake_sample)
    problems = [{"id": k, "prompt": k, "answer": "right"} for k in canned]

    def verifier(prompt, completion, answer):  # 'right*' = 1, '?' = unjudged, else 0
        return None if completion == "?" else float(completion.startswith(answer))

    tok = build_tokenizer()
    pairs = build_onpolicy_pairs(None, tok, problems, verifier, 10, 4, SamplingParams(), seed=0, batch_size=64)
    by_id = {p["prompt_id"]: p for p in pairs}
    assert set(by_id) == {"p0", "p2"}
    assert (by_id["p0"]["chosen"], by_id["p0"]["rejected"]) == ("right", "wrong")
    assert (by_id["p2"]["chosen"], by_id["p2"]["rejected"]) == ("right", "nope")
    assert len(build_onpolicy_pairs(None, tok, problems, verifier, 1, 4, SamplingParams(), seed=0)) == 1


def test_pair_builder_is_deterministic_for_a_seed(tiny_base):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    problems = [{"id": p.id, "prompt": p.prompt, "answer": p.answer} for p in make_problems(0, 6, 1)[0]]

    def parity(prompt, completion, answer):  # a verifier that splits random text about evenly
        return float(len(completion) % 2 == 0)

    params = SamplingParams(max_new_tokens=6, stop_strings=())
    a = build_onpolicy_pairs(model, tok, problems, parity, 4, 4, params, seed=1, batch_size=8)
    b = build_onpolicy_pairs(model, tok, problems, parity, 4, 4, params, seed=1, batch_size=8)
    c = build_onpolicy_pairs(model, tok, problems, parity, 4, 4, params, seed=2, batch_size=8)
    assert a == b and 0 < len(a) <= 4 and a != c
    for p in a:
        assert len(p["chosen"]) % 2 == 0 and len(p["rejected"]) % 2 == 1


def test_completion_mask_covers_completion_and_eos():
    tok = build_tokenizer()
    ids, n_prompt = encode_sequence(tok, "Q: 1+2\nA:", "<answer>3</answer>", 64)
    assert n_prompt == 10 and len(ids) == 10 + 3 + 1  # BOS + 9 prompt chars; 3 tokens + EOS
    b = collate_sequences([(ids, n_prompt), (ids[:12], n_prompt)], pad_id=tok.pad_token_id)
    # shifted index 9..12 predicts tokens 10..13; the truncated row keeps 9..10
    assert b["completion_mask"][0].nonzero().flatten().tolist() == [9, 10, 11, 12]
    assert b["completion_mask"][1].nonzero().flatten().tolist() == [9, 10]


# ----------------------------------------------------------------------------- DPO


def test_first_dpo_step_loss_is_ln2_and_ipo_is_inverse_2beta_squared(tiny_base, pref_file, tmp_path):
    # policy == reference at step 1: h = 0, so sigmoid: -log sigma(0) = ln 2 = 0.693147,
    # rewards and margin 0; IPO: (0 - 1 / (2 * 0.1))^2 = 5^2 = 25.
    res = train_dpo(dpo_spec(tiny_base, pref_file, tmp_path / "sig", max_steps=1))
    m = res["last_metrics"]
    assert m["loss"] == pytest.approx(LN2, abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)
    assert m["rewards/margin"] == pytest.approx(0.0, abs=1e-5)
    assert res["num_examples"] == 8 and res["dropped_examples"] == 0
    ipo = train_dpo(dpo_spec(tiny_base, pref_file, tmp_path / "ipo", max_steps=1, loss_type="ipo"))
    assert ipo["last_metrics"]["loss"] == pytest.approx(25.0, abs=1e-3)
    # RPO: ln 2 plus alpha times the chosen completions' mean per-token NLL (a positive number)
    rpo = train_dpo(dpo_spec(tiny_base, pref_file, tmp_path / "rpo", max_steps=1, rpo_alpha=0.5))
    m = rpo["last_metrics"]
    assert m["nll_loss"] > 0.1 and "nll_loss" not in res["last_metrics"]
    assert m["loss"] == pytest.approx(LN2 + 0.5 * m["nll_loss"], abs=1e-5)


def test_second_dpo_step_metrics_are_the_loss_of_the_first_steps_weights(tiny_base, pref_file, tmp_path):
    """Step 2 logs the DPO loss of the weights after step 1 on all 8 pairs (batch 8 = the whole file),
    computed here by hand from sequence log-probs; the first step's gradient raised every margin."""
    from transformers import AutoModelForCausalLM

    from models.training.engine import read_metrics
    from models.data.preference_pairs import tokenize_pairs
    from models.recipes.dpo import reference_logps

    one = train_dpo(dpo_spec(tiny_base, pref_file, tmp_path / "one", max_steps=1, lr=3e-3))
    two = train_dpo(dpo_spec(tiny_base, pref_file, tmp_path / "two", max_steps=2, lr=3e-3))
    step2 = read_metrics(two["metrics_path"])[1]
    tok = build_tokenizer()
    rows = [json.loads(ln) for ln in pref_file.read_text().splitlines()]
    items, _ = tokenize_pairs(rows, tok, 64)

    def logps(path):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        return reference_logps(model, items, tok.pad_token_id, 8)

    ref, pol = logps(tiny_base), logps(one["output_dir"])
    # Rafailov et al. 2023, eq. 7: r = beta * (log pi - log pi_ref) summed over completion tokens,
    # loss_i = -log sigma(r_chosen_i - r_rejected_i) = softplus(-(r_c - r_r)), beta 0.1; means over 8 pairs
    r_c = 0.1 * (pol["chosen_sum"] - ref["chosen_sum"])
    r_r = 0.1 * (pol["rejected_sum"] - ref["rejected_sum"])
    margin = r_c - r_r
    assert step2["loss"] == pytest.approx(torch.nn.functional.softplus(-margin).mean().item(), abs=1e-5)
    assert step2["rewards/chosen"] == pytest.approx(r_c.mean().item(), abs=1e-5)
    assert step2["rewards/margin"] == pytest.approx(margin.mean().item(), abs=1e-5)
    assert step2["rewards/accuracy"] == (margin > 0).float().mean().item()
    # one descent step on -log sigma(margin) from margin 0 moves the mean margin up: loss below ln 2
    assert margin.mean().item() > 0 and step2["loss"] < LN2


@pytest.mark.parametrize("rpo_alpha", [None, 1.0])
def test_micro_batches_equal_one_batch(tiny_base, pref_file, tmp_path, rpo_alpha):
    one = train_dpo(dpo_spec(tiny_base, pref_file, tmp_path / "one", rpo_alpha=rpo_alpha))
    # 8 accumulation steps
    acc = train_dpo(dpo_spec(tiny_base, pref_file, tmp_path / "acc", micro_batch_size=1, rpo_alpha=rpo_alpha))
    w1, w2 = _weights(one["output_dir"]), _weights(acc["output_dir"])
    # Adam divides by sqrt(v): an entry whose gradient is ~0 turns float-order noise into up to a full
    # lr-sized move. atol 2e-5 = 2% of one lr (1e-3) step; a wrong normaliser would be off by ~lr.
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=2e-5)
    assert one["last_metrics"]["loss"] == pytest.approx(acc["last_metrics"]["loss"], rel=1e-5)


def test_resume_reuses_pairs_and_reference_and_matches_a_straight_run(tiny_base, pref_file, tmp_path, monkeypatch):
    calls = []
    real = dpo_mod.reference_logps
    monkeypatch.setattr(dpo_mod, "reference_logps", lambda *a, **k: calls.append(1) or real(*a, **k))

    straight = train_dpo(dpo_spec(tiny_base, pref_file, tmp_path / "straight", max_steps=4))
    work = tmp_path / "crashy"
    train_dpo(dpo_spec(tiny_base, pref_file, work, max_steps=2))
    pairs_mtime = (work / "pairs.jsonl").stat().st_mtime_ns
    shutil.rmtree(work / "output")  # as if killed after the step-2 checkpoint
    resumed = train_dpo(dpo_spec(tiny_base, pref_file, work, max_steps=4))
    assert resumed["resumed_from_step"] == 2
    assert len(calls) == 2  # once per work dir: the resume read ref_logps.pt
    assert (work / "pairs.jsonl").stat().st_mtime_ns == pairs_mtime
    ws, wr = _weights(straight["output_dir"]), _weights(resumed["output_dir"])
    for k in ws:
        torch.testing.assert_close(ws[k], wr[k], rtol=0, atol=0)


def test_onpolicy_dpo_end_to_end(tiny_base, tmp_path):
    from models.rewards import register_reward

    register_reward("_test_parity")(lambda prompt, completion, answer: float(len(completion) % 2 == 0))
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": p.id, "prompt": p.prompt, "answer": p.answer}) + "\n"
                                for p in make_problems(0, 6, 1)[0]))
    spec = dpo_spec(tiny_base, "unused", tmp_path / "w", dataset="onpolicy", reward="_test_parity", num_pairs=4,
                    samples_per_prompt=4, max_new_tokens=6, stop_strings=[], batch_size=2, micro_batch_size=2,
                    max_steps=1, rollout_batch_size=8)
    spec.pop("dataset_path")
    spec["prompts_path"] = str(problems)
    res = train_dpo(spec)
    pairs = [json.loads(ln) for ln in (tmp_path / "w" / "pairs.jsonl").read_text().splitlines()]
    assert 0 < len(pairs) <= 4 and res["num_examples"] == len(pairs)
    assert res["last_metrics"]["loss"] == pytest.approx(LN2, abs=1e-5)


# ----------------------------------------------------------------------------- reward model


def _accuracy(scorer, pref_file) -> float:
    rows = [json.loads(ln) for ln in Path(pref_file).read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    sc = scorer(prompts, [r["chosen"] for r in rows])
    sr = scorer(prompts, [r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(sc, sr)) / len(rows)


def test_reward_model_learns_its_pairs_and_round_trips(tiny_base, pref_file, tmp_path):
    from models.training.engine import read_metrics
    from models.modeling.heads import RewardModel

    before = train_reward_model(rm_spec(tiny_base, pref_file, tmp_path / "r0", max_steps=1, lr=1e-12))
    after = train_reward_model(rm_spec(tiny_base, pref_file, tmp_path / "r1", max_steps=12, lr=3e-3))
    rows = read_metrics(after["metrics_path"])
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["accuracy"] > rows[0]["accuracy"]
    out = Path(after["output_dir"])
    assert json.loads((out / "posttrain.json").read_text())["kind"] == "reward_model"
    scorer = load_reward_scorer(out, batch_size=3)
    assert _accuracy(scorer, pref_file) > _accuracy(load_reward_scorer(before["output_dir"]), pref_file)
    # the scorer's batched scores are those of RewardModel.load on one sequence at a time
    rm = RewardModel.load(out, dtype=torch.float32).eval()
    tok = build_tokenizer()
    ids, _ = encode_sequence(tok, "Q: 1+2\nA:", "<think>1+2=3</think><answer>3</answer>", 64)
    with torch.no_grad():
        direct = rm(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item()
    got = scorer(["Q: 1+2\nA:", "Q: 3-1\nA:"], ["<think>1+2=3</think><answer>3</answer>", "<answer>2</answer>"])
    assert got[0] == pytest.approx(direct, abs=1e-5) and len(got) == 2
    with pytest.raises(ValueError, match="not a reward model"):
        load_reward_scorer(tiny_base)


def test_reward_model_micro_batches_equal_one_batch(tiny_base, pref_file, tmp_path):
    over = dict(center_rewards_coefficient=0.01)
    one = train_reward_model(rm_spec(tiny_base, pref_file, tmp_path / "one", **over))
    acc = train_reward_model(rm_spec(tiny_base, pref_file, tmp_path / "acc", micro_batch_size=2, **over))
    w1, w2 = _weights(one["output_dir"]), _weights(acc["output_dir"])
    for k in w1:  # atol: see test_micro_batches_equal_one_batch
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=2e-5)
    from safetensors.torch import load_file

    h1 = load_file(f"{one['output_dir']}/score_head.safetensors")
    h2 = load_file(f"{acc['output_dir']}/score_head.safetensors")
    for k in h1:
        torch.testing.assert_close(h1[k], h2[k], rtol=1e-5, atol=2e-5)


def test_configs_reject_unknown_keys_and_smoothing_with_ipo():
    with pytest.raises(ValueError, match="label_smoothing"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError):
        RewardModelConfig(margin=1.0)
    assert DPOConfig().beta == 0.1 and DPOConfig().loss_type == "sigmoid"
    assert RewardModelConfig().center_rewards_coefficient is None


@pytest.mark.slow
def test_two_ranks_train_on_rank0_pairs_and_match_one_rank(tiny_base, pref_file, tmp_path):
    """world_size 2 (torchrun, 2 x 4 pairs) gives the weights of world_size 1 (8 pairs); rank 1 reads
    rank 0's pairs.jsonl and ref_logps.pt instead of building its own."""
    from models.training.launch import run_training

    one = train_dpo(dpo_spec(tiny_base, pref_file, tmp_path / "one"))
    spec = dpo_spec(tiny_base, pref_file, tmp_path / "two", world_size=2, micro_batch_size=4)
    two = run_training("models.recipes.dpo:train_dpo", spec, 2, tmp_path / "two")
    w1, w2 = _weights(one["output_dir"]), _weights(two["output_dir"])
    for k in w1:  # atol: see test_micro_batches_equal_one_batch
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-5, atol=2e-5)
