"""Evaluation metrics over sampled answers: pass@k, majority vote and a scorer's agreement with a
verifier. Pure functions, no model."""

from __future__ import annotations

from collections import Counter


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased estimate of pass@k from n samples of which c are correct (Chen et al. 2021, "Evaluating
    Large Language Models Trained on Code", eq. 1): 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k / i), the paper's numerically stable form, which never
    forms the huge binomials. Equals 1.0 when n - c < k (every k-subset holds a correct sample).
    """
    if not 0 <= c <= n:
        raise ValueError(f"need 0 <= c <= n, got n={n}, c={c}")
    if k < 1 or k > n:
        raise ValueError(f"need 1 <= k <= n, got k={k}, n={n}")
    if n - c < k:
        return 1.0
    fail = 1.0
    for i in range(n - c + 1, n + 1):
        fail *= 1.0 - k / i
    return 1.0 - fail


def majority_vote(answers: list[str | None]) -> str | None:
    """The most frequent non-None answer; ties go to the answer that appeared first. None if no votes."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    return next(a for a in answers if a is not None and counts[a] == best)


def majority_at_k(answers: list[str | None], correct: list[bool], k: int) -> float:
    """maj@k (self-consistency, Wang et al. 2023): vote over the first k extracted answers (None answers
    do not vote; ties broken by first occurrence); 1.0 if the voted answer is correct, else 0.0.

    answers[i] is the answer extracted from sample i and correct[i] whether sample i was judged correct;
    the voted answer's correctness is read from its first sample.
    """
    if len(answers) != len(correct):
        raise ValueError("answers and correct must have the same length")
    voted = majority_vote(answers[:k])
    if voted is None:
        return 0.0
    return 1.0 if correct[answers.index(voted)] else 0.0


def pairwise_agreement(scores: list[float], correct: list[bool], groups: list) -> tuple[float, int]:
    """How often a scorer (a reward model) ranks a correct completion above an incorrect completion
    of the same prompt: over every (correct, incorrect) pair within a group, the fraction with
    score(correct) > score(incorrect), ties counting 1/2. Returns (agreement, number of pairs);
    (nan, 0) when no group holds both kinds. It is the reward model's pair accuracy measured on
    the policy's own samples, judged by the verifier (0.5 = chance)."""
    if not len(scores) == len(correct) == len(groups):
        raise ValueError(f"need equal lengths, got {len(scores)}, {len(correct)}, {len(groups)}")
    by_group: dict = {}
    for s, c, g in zip(scores, correct, groups):
        by_group.setdefault(g, ([], []))[0 if c else 1].append(float(s))
    won, pairs = 0.0, 0
    for good, bad in by_group.values():
        for a in good:
            for b in bad:
                won += 1.0 if a > b else 0.5 if a == b else 0.0
                pairs += 1
    return (won / pairs if pairs else float("nan")), pairs
