"""Evaluate a causal LM on verifiable problems: greedy pass@1 plus pass@k / maj@k from k samples.

A plain function of a model, a tokenizer, problems and a verifier; the Prefect task around it only
resolves inputs and records the outputs. It returns the metrics and one row per generated completion
(greedy and sampled), the rows being what the evaluation dataset contract stores.
"""

from __future__ import annotations

from collections.abc import Callable

from models.modeling.chat import ChatTemplate, encode_prompt, prompt_text
from models.algorithms.metrics import majority_at_k, pass_at_k
from models.generation.rollouts import SamplingParams, sample

# A completion counts as correct when its reward reaches 1.0; the epsilon forgives float round-off of
# rewards that are sums/products of partial scores. None (could not be judged) is never correct.
CORRECT_THRESHOLD = 1.0 - 1e-6


def is_correct(reward: float | None) -> bool:
    return reward is not None and reward >= CORRECT_THRESHOLD


def evaluate(
    model,
    tokenizer,
    problems: list[dict],
    verifier: Callable[[str, str, str], float | None],
    extract_answer: Callable[[str], str | None] | None,
    *,
    num_problems: int,
    k: int,
    temperature: float,
    max_new_tokens: int,
    batch_size: int,
    seed: int,
    stop_strings: tuple[str, ...] = ("</answer>",),
    chat_template: ChatTemplate | None = None,
) -> tuple[dict[str, float], list[dict]]:
    """Score the first `num_problems` problems (each a dict with keys id, prompt, answer; a prompt is a
    string or a conversation, rendered by `models.modeling.chat.encode_prompt` under `chat_template`).

    Metrics:
      - `pass@1`: fraction of problems whose greedy completion is correct (reward >= 1.0 - 1e-6);
      - `mean_length`: mean number of greedy completion tokens;
      - with k > 1, from k samples per problem at `temperature`: `pass@{k}` (unbiased estimator with
        n = k, which reduces to "any of the k is correct"), `sampled_accuracy` (mean correctness of
        all samples) and, when `extract_answer` is given, `maj@{k}` (majority vote over the extracted
        answers);
      - `num_problems`.

    Rows: one dict per completion: problem_id, sample_idx (greedy: 0; samples: 0..k-1), greedy, completion,
    reward, correct, num_tokens, finish_reason.
    """
    chosen = problems[:num_problems]
    if not chosen:
        raise ValueError("no problems to evaluate")
    prompts = [encode_prompt(tokenizer, p["prompt"], chat_template) for p in chosen]

    def judge(problem: dict, completion: str) -> float | None:
        reward = verifier(prompt_text(problem["prompt"]), completion, problem["answer"])
        return None if reward is None else float(reward)

    def row(problem: dict, rollout, greedy: bool) -> dict:
        reward = judge(problem, rollout.completion_text)
        return {
            "problem_id": str(problem["id"]),
            "sample_idx": rollout.sample_index,
            "greedy": greedy,
            "completion": rollout.completion_text,
            "reward": reward,
            "correct": is_correct(reward),
            "num_tokens": len(rollout.completion_ids),
            "finish_reason": rollout.finish_reason,
        }

    greedy_params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True, stop_strings=tuple(stop_strings))
    greedy_rollouts = sample(model, tokenizer, prompts, 1, greedy_params, seed=seed, batch_size=batch_size)
    rows = [row(chosen[r.prompt_index], r, greedy=True) for r in greedy_rollouts]
    n = len(chosen)
    metrics: dict[str, float] = {
        "pass@1": sum(r["correct"] for r in rows) / n,
        "mean_length": sum(r["num_tokens"] for r in rows) / n,
    }

    if k > 1:
        if temperature > 0:
            params = SamplingParams(
                max_new_tokens=max_new_tokens, temperature=temperature, stop_strings=tuple(stop_strings)
            )
        else:  # temperature 0 means argmax: k identical samples, still reported under the same keys
            params = greedy_params
        rollouts = sample(model, tokenizer, prompts, k, params, seed=seed, batch_size=batch_size)
        sampled = [row(chosen[r.prompt_index], r, greedy=False) for r in rollouts]
        rows.extend(sampled)
        pass_k, maj_k = 0.0, 0.0
        for i in range(n):  # rollouts are group-contiguous: problem i's samples are [i*k, (i+1)*k)
            group = sampled[i * k : (i + 1) * k]
            correct = [r["correct"] for r in group]
            pass_k += pass_at_k(k, sum(correct), k)
            if extract_answer is not None:
                answers = [extract_answer(r["completion"]) for r in group]
                maj_k += majority_at_k(answers, correct, k)
        metrics[f"pass@{k}"] = pass_k / n
        if extract_answer is not None:
            metrics[f"maj@{k}"] = maj_k / n
        metrics["sampled_accuracy"] = sum(r["correct"] for r in sampled) / len(sampled)
    metrics["num_problems"] = float(n)
    return metrics, rows
