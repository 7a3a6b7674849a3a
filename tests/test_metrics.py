"""Tests of models/algorithms/metrics.py (hand-computed) and models/generation/evaluation.py (on a tiny random Llama)."""

from __future__ import annotations

import math

import pytest

from models.generation.evaluation import evaluate
from models.algorithms.metrics import majority_at_k, majority_vote, pairwise_agreement, pass_at_k


def test_pass_at_k_by_hand():
    # 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # k=1 is the fraction correct: 1 - C(7,1)/C(10,1) = 1 - 7/10 = 0.3
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    # no correct sample -> 0; n - c < k -> 1 (every 3-subset of 4 with 2 correct holds one)
    assert pass_at_k(10, 0, 3) == 0.0
    assert pass_at_k(4, 2, 3) == 1.0
    # n = k: "any correct" -> 1 if c > 0
    assert pass_at_k(8, 1, 8) == 1.0
    assert pass_at_k(8, 0, 8) == 0.0


def test_pass_at_k_matches_binomial_oracle_and_is_stable():
    for n in range(1, 13):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 if n - c < k else 1 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    # large n, where C(n, k) overflows a float: stays finite and in [0, 1]
    got = pass_at_k(5000, 10, 1000)
    assert 0.0 <= got <= 1.0 and got == pytest.approx(1 - math.comb(4990, 1000) / math.comb(5000, 1000))


def test_pass_at_k_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)


def test_majority_vote_by_hand():
    # "3" has two votes, "4" one, None does not vote
    assert majority_vote(["3", None, "4", "3", None]) == "3"
    # tie between "4" and "3" (one each among the first 2): the first occurrence wins
    assert majority_vote(["4", "3"]) == "4"
    assert majority_vote([None, None]) is None


def test_majority_at_k_by_hand():
    answers = ["5", "7", None, "7", "5", "5"]
    correct = [True, False, False, False, True, True]
    # first 4: "7" x2, "5" x1 -> "7", wrong
    assert majority_at_k(answers, correct, 4) == 0.0
    # first 6: "5" x3, "7" x2 -> "5", right
    assert majority_at_k(answers, correct, 6) == 1.0
    # first 2: tie "5"/"7" -> "5" (first) -> right
    assert majority_at_k(answers, correct, 2) == 1.0
    # only None answers -> no vote -> 0
    assert majority_at_k([None, None], [False, False], 2) == 0.0


# --------------------------------------------------------------------------------------------------
# evaluate() on the project's tiny random Llama (real sampling, toy verifier)


@pytest.fixture(scope="module")
def tiny():
    from models.modeling.tiny_model import build_tiny_model
    from models.modeling.tokenizer import build_tokenizer

    tok = build_tokenizer()
    return build_tiny_model(tok, seed=0, hidden_size=32, num_layers=2, intermediate_size=64), tok


def parity_answer(completion: str) -> str | None:
    """Toy extractor: the parity of the completion's length; None for an empty completion."""
    return str(len(completion) % 2) if completion else None


def parity_verifier(prompt: str, completion: str, reference: str) -> float | None:
    answer = parity_answer(completion)
    return None if answer is None else float(answer == reference)


PROBLEMS = [{"id": f"p{i}", "prompt": f"{i}+{i % 3}", "answer": str(i % 2)} for i in range(8)]


def run_eval(tiny, k: int, **kw):
    model, tok = tiny
    settings = dict(num_problems=6, k=k, temperature=1.0, max_new_tokens=9, batch_size=5, seed=0)
    settings.update(kw)
    return evaluate(model, tok, PROBLEMS, parity_verifier, parity_answer, **settings)


def test_evaluate_metrics_agree_with_rows(tiny):
    k = 4
    metrics, rows = run_eval(tiny, k)
    greedy = [r for r in rows if r["greedy"]]
    sampled = [r for r in rows if not r["greedy"]]
    ids = [p["id"] for p in PROBLEMS[:6]]
    assert [r["problem_id"] for r in greedy] == ids and all(r["sample_idx"] == 0 for r in greedy)
    assert [(r["problem_id"], r["sample_idx"]) for r in sampled] == [(i, s) for i in ids for s in range(k)]
    for r in rows:
        assert set(r) == {"problem_id", "sample_idx", "greedy", "completion", "reward", "correct",
                          "num_tokens", "finish_reason"}  # fmt: skip
        assert r["correct"] == (r["reward"] is not None and r["reward"] >= 1.0 - 1e-6)
        assert r["finish_reason"] in {"stop", "eos", "length"} and 1 <= r["num_tokens"] <= 9
    assert metrics["num_problems"] == 6
    assert metrics["pass@1"] == pytest.approx(sum(r["correct"] for r in greedy) / 6)
    assert metrics["mean_length"] == pytest.approx(sum(r["num_tokens"] for r in greedy) / 6)
    assert metrics["sampled_accuracy"] == pytest.approx(sum(r["correct"] for r in sampled) / (6 * k))
    groups = [sampled[i * k : (i + 1) * k] for i in range(6)]
    # with n = k the unbiased pass@k is "any of the k samples is correct"
    assert metrics[f"pass@{k}"] == pytest.approx(sum(any(r["correct"] for r in g) for g in groups) / 6)
    maj = [majority_at_k([parity_answer(r["completion"]) for r in g], [r["correct"] for r in g], k) for g in groups]
    assert metrics[f"maj@{k}"] == pytest.approx(sum(maj) / 6)
    # the toy task is a coin flip: a run where everything agrees would not test much
    assert 0 < sum(r["correct"] for r in sampled) < len(sampled)
    # deterministic for a seed
    assert run_eval(tiny, k) == (metrics, rows)


def test_evaluate_k1_is_greedy_only(tiny):
    metrics, rows = run_eval(tiny, 1, num_problems=3)
    assert set(metrics) == {"pass@1", "mean_length", "num_problems"}
    assert len(rows) == 3 and all(r["greedy"] for r in rows)


def test_pairwise_agreement_by_hand():
    # prompt a: correct {3, 1}, incorrect {2}: 3>2 wins, 1<2 loses -> 1 of 2
    # prompt b: correct {5}, incorrect {5, 0}: a tie (1/2) and a win -> 1.5 of 2
    # prompt c: only correct completions: no pair
    scores = [3, 1, 2, 5, 5, 0, 9]
    correct = [True, True, False, True, False, False, True]
    groups = ["a", "a", "a", "b", "b", "b", "c"]
    assert pairwise_agreement(scores, correct, groups) == (pytest.approx(2.5 / 4), 4)
    assert math.isnan(pairwise_agreement([1.0, 2.0], [True, True], [0, 0])[0])
    assert pairwise_agreement([1.0, 2.0], [True, False], [0, 1]) == (pytest.approx(float("nan"), nan_ok=True), 0)
    with pytest.raises(ValueError, match="equal lengths"):
        pairwise_agreement([1.0], [True, False], [0, 0])
