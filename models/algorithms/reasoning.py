"""What an RL stage's completions show about reasoning, per step: how long correct and incorrect
answers are, how many follow the answer format, and how often configurable *reasoning markers*
(regexes: working step by step, checking the result) appear; and the "aha" step, where a marker's
rate crosses a threshold and stays there (DeepSeek-R1-Zero's self-verification emerging, Guo et al.
2025, sec. 2.2.4).

Pure functions of training items (dicts with ``completion_text``, ``completion_ids``, ``correct``,
``finish_reason``) and of metric rows; the GRPO and PPO step functions sum `chunk_metrics` over
micro-batches and ranks like every other metric (each is the chunk's share of a global-batch mean).
"""

from __future__ import annotations

import re

# The built-in task (models/data/builtin_task.py): a worked step is an operation and its result, in the SFT
# format ("4-0=4") or in the pretraining corpus' free-form style ("4-0 is 4"); two or more of them in
# one completion is working step by step. A self-check names the act of checking the result.
BUILTIN_MARKERS = {
    "step_by_step": r"(?s)(?:-?\d+\s*[-+]\s*\d+\s*(?:=|is)\s*-?\d+.*?){2,}",
    "self_check": r"(?i)\b(?:check(?:ing|ed)?|verif(?:y|ied|ying)|wait|let me re-?(?:do|compute))\b",
}


def marker_flags(text: str, markers: dict[str, str]) -> dict[str, bool]:
    """Whether each marker's regex matches somewhere in `text`."""
    return {name: re.search(pattern, text) is not None for name, pattern in markers.items()}


def chunk_metrics(chunk: list[dict], global_batch: list[dict]) -> dict[str, float]:
    """The chunk's additive shares of the step's reasoning metrics (summed over chunks: the global
    values). Items carry ``formatted`` (bool) and ``markers`` ({name: bool}) from the batch builder.

    - length_correct / length_incorrect: mean completion tokens of the correct / incorrect
      completions of the global batch (0 when there are none);
    - format_rate: fraction of completions in the answer format;
    - marker/<name>: fraction of completions where the marker appears.
    """
    n = len(global_batch)
    n_correct = sum(1 for it in global_batch if it["correct"])
    n_wrong = n - n_correct
    out = {
        "length_correct": sum(len(it["completion_ids"]) for it in chunk if it["correct"]) / max(1, n_correct),
        "length_incorrect": sum(len(it["completion_ids"]) for it in chunk if not it["correct"]) / max(1, n_wrong),
        "format_rate": sum(1 for it in chunk if it.get("formatted")) / n,
    }
    names = {name for it in global_batch for name in it.get("markers", {})}
    for name in sorted(names):
        out[f"marker/{name}"] = sum(1 for it in chunk if it.get("markers", {}).get(name)) / n
    return out


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average over up to `window` values (the first ones average what exists)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def aha_step(rows: list[dict], key: str, threshold: float, window: int) -> int | None:
    """The first logged step from which the smoothed `key` stays at or above `threshold` to the end
    of the run, if it was below it before (a rate that starts high has no aha); else None.

    rows: metric rows with ``step`` and `key` (rows without the key are skipped)."""
    pts = [(r["step"], float(r[key])) for r in rows if r.get(key) is not None and r.get("step") is not None]
    if not pts:
        return None
    steps = [s for s, _ in pts]
    smoothed = smooth([v for _, v in pts], window)
    if smoothed[0] >= threshold or smoothed[-1] < threshold:
        return None
    first = len(smoothed)
    while first > 0 and smoothed[first - 1] >= threshold:
        first -= 1
    return steps[first]


__all__ = ["BUILTIN_MARKERS", "marker_flags", "chunk_metrics", "smooth", "aha_step"]
