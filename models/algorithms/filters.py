"""Rejection sampling, part 2: which scored samples become refine (SFT) data.

Each filter is a pure function `DataFrame -> DataFrame` that returns a subset of the rows it got, in
the same order and with the same index (so a kept row can be traced to the sample it was).
`apply_filters` runs them in the configured order and reports what each removed.

Report convention: a filter switched off by its own setting (`min_reward=None`, `best_of_n=False`,
`dedupe="none"`, no length bounds, `require_format=False`, `max_per_prompt=None`) does not run and is
**absent** from the report, so every report row is a filter that actually looked at the data.

Per-prompt filters (pass_rate, dedupe, best_of_n, max_per_prompt) group by `prompt_id`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd

from models.recipes.sample_filter_config import FilterConfig

# `total >= min_reward` forgives float round-off of weighted sums (0.7 * 1 + 0.3 * 1 may land just below
# 1.0); models/generation/evaluation.py counts "correct" with the same slack.
REWARD_TOLERANCE = 1e-6
FORMAT_COLUMN = "reward/format"  # the samples contract's `reward/<name>` column (no torch import here)


class NothingSurvivedError(ValueError):
    """The filters removed every sample. `report` holds the report rows up to the emptying filter."""

    def __init__(self, message: str, report: list[dict]):
        super().__init__(message)
        self.report = report


def _need(df: pd.DataFrame, columns: tuple[str, ...], who: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ValueError(f"filter {who!r}: missing column(s) {missing} (have {list(df.columns)})")


def _number(v) -> float | None:
    """A cell as a float; None/NaN/non-numbers as None (never judged passing)."""
    if v is None or isinstance(v, bool):
        return None
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


# ----------------------------------------------------------------------------- row-local filters


def filter_format(df: pd.DataFrame) -> pd.DataFrame:
    """Keep rows whose `reward/format` is 1.0. Without that column the `format` reward is computed
    here from (prompt, completion, reference); a None (unjudged) format never passes."""
    if FORMAT_COLUMN in df.columns:
        values = df[FORMAT_COLUMN].map(_number)
    else:
        _need(df, ("completion",), "format")
        from models.rewards import get_reward

        fmt = get_reward("format")

        def judge(row) -> float | None:
            try:
                return _number(fmt(row.get("prompt", ""), row["completion"], row.get("reference", "")))
            except Exception:  # a reward must not raise on model output; if one does, the row fails
                return None

        values = df.apply(judge, axis=1) if len(df) else pd.Series([], dtype=object)
    keep = values.map(lambda x: x is not None and x >= 1.0 - REWARD_TOLERANCE)
    return df[keep.astype(bool)]


def _passes(df: pd.DataFrame, threshold: float) -> pd.Series:
    """Per row: a judged `total >= threshold` (within REWARD_TOLERANCE)."""
    return df["total"].map(lambda v: (x := _number(v)) is not None and x >= threshold - REWARD_TOLERANCE).astype(bool)


def filter_reward(df: pd.DataFrame, min_reward: float) -> pd.DataFrame:
    """Keep rows with `total >= min_reward` (within REWARD_TOLERANCE)."""
    _need(df, ("total",), "reward")
    return df[_passes(df, min_reward)]


def filter_length(df: pd.DataFrame, min_length: int | None = None, max_length: int | None = None) -> pd.DataFrame:
    """Keep rows with `min_length <= length <= max_length` (completion tokens; None = no bound)."""
    _need(df, ("length",), "length")
    lo = -math.inf if min_length is None else min_length
    hi = math.inf if max_length is None else max_length
    keep = df["length"].map(lambda v: (x := _number(v)) is not None and lo <= x <= hi)
    return df[keep.astype(bool)]


# ----------------------------------------------------------------------------- per-prompt filters


def filter_pass_rate(df: pd.DataFrame, max_pass_rate: float, threshold: float) -> pd.DataFrame:
    """Drop every row of a prompt whose pass rate (the fraction of its rows with `total >= threshold`)
    is above `max_pass_rate`. Prompts the model already solves every time teach a re-fine-tune
    nothing and crowd out the ones it solves sometimes (difficulty filtering: the hard-prompt
    selection of RAFT-style expert iteration and of DAPO's dynamic sampling). It needs every sample of
    a prompt, so it runs before any filter that drops rows."""
    if not 0.0 <= max_pass_rate <= 1.0:
        raise ValueError(f"max_pass_rate must be in [0, 1], got {max_pass_rate}")
    _need(df, ("prompt_id", "total"), "pass_rate")
    rate = _passes(df, threshold).astype(float).groupby(df["prompt_id"].map(str).to_numpy()).transform("mean")
    return df[(rate <= max_pass_rate + REWARD_TOLERANCE).to_numpy()]


def normalize_completion(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped, lowercased: `' A\\n  b'` -> `'a b'`."""
    return " ".join(str(text).split()).lower()


def filter_dedupe(df: pd.DataFrame, mode: str = "normalized") -> pd.DataFrame:
    """Drop a row whose completion repeats an earlier row's for the same prompt; the first is kept.
    mode: 'exact' (string equality), 'normalized' (see normalize_completion) or 'none' (no-op)."""
    if mode == "none":
        return df
    if mode not in ("exact", "normalized"):
        raise ValueError(f"dedupe mode must be 'none', 'exact' or 'normalized', got {mode!r}")
    _need(df, ("prompt_id", "completion"), "dedupe")
    key = df["completion"].map(str if mode == "exact" else normalize_completion)
    seen = pd.DataFrame({"p": df["prompt_id"].map(str), "c": key}).duplicated(keep="first")
    return df[~seen.to_numpy()]


def filter_best_of_n(df: pd.DataFrame) -> pd.DataFrame:
    """Keep one row per prompt: the highest `total`; ties go to the shortest `length`, then to the
    row that comes first. Rows without a numeric total rank last."""
    _need(df, ("prompt_id", "total", "length"), "best_of_n")
    best: dict[str, tuple] = {}  # prompt_id -> (rank key, position)
    for pos, (pid, total, length) in enumerate(zip(df["prompt_id"], df["total"], df["length"])):
        t, n = _number(total), _number(length)
        key = (-(t if t is not None else -math.inf), n if n is not None else math.inf, pos)
        pid = str(pid)
        if pid not in best or key < best[pid]:
            best[pid] = key
    keep_pos = sorted(k[2] for k in best.values())
    return df.iloc[keep_pos]


def filter_max_per_prompt(df: pd.DataFrame, max_per_prompt: int) -> pd.DataFrame:
    """Keep the first `max_per_prompt` rows of each prompt (row order = sample order: no preference
    for short or high-reward samples beyond what earlier filters imposed)."""
    if max_per_prompt < 1:
        raise ValueError(f"max_per_prompt must be >= 1, got {max_per_prompt}")
    _need(df, ("prompt_id",), "max_per_prompt")
    rank = df.groupby(df["prompt_id"].map(str).to_numpy(), sort=False).cumcount()
    return df[(rank < max_per_prompt).to_numpy()]


# ----------------------------------------------------------------------------- composition


def enabled_filters(cfg: FilterConfig) -> list[tuple[str, Callable[[pd.DataFrame], pd.DataFrame]]]:
    """(name, function) of every filter `cfg` switches on, in `cfg.order`."""
    on: dict[str, Callable[[pd.DataFrame], pd.DataFrame] | None] = {
        "pass_rate": (
            (lambda d: filter_pass_rate(d, cfg.max_pass_rate, cfg.min_reward))
            if cfg.max_pass_rate is not None
            else None
        ),
        "format": filter_format if cfg.require_format else None,
        "reward": (lambda d: filter_reward(d, cfg.min_reward)) if cfg.min_reward is not None else None,
        "length": (
            (lambda d: filter_length(d, cfg.min_length, cfg.max_length))
            if cfg.min_length is not None or cfg.max_length is not None
            else None
        ),
        "dedupe": (lambda d: filter_dedupe(d, cfg.dedupe)) if cfg.dedupe != "none" else None,
        "best_of_n": filter_best_of_n if cfg.best_of_n else None,
        "max_per_prompt": (
            (lambda d: filter_max_per_prompt(d, cfg.max_per_prompt)) if cfg.max_per_prompt is not None else None
        ),
    }
    return [(name, on[name]) for name in cfg.order if on[name] is not None]


def apply_filters(df: pd.DataFrame, cfg: FilterConfig) -> tuple[pd.DataFrame, list[dict]]:
    """Run the enabled filters in `cfg.order`.

    Returns the kept rows (original order and index) and the report
    `[{"filter": name, "before": n, "removed": k, "after": n - k}, ...]` in application order (switched-
    off filters absent). Raises NothingSurvivedError, naming the filter that removed the last rows and
    the counts so far, when nothing is left (or nothing was given).
    """
    if len(df) == 0:
        raise NothingSurvivedError("no samples to filter (the input is empty)", [])
    report: list[dict] = []
    for name, fn in enabled_filters(cfg):
        before = len(df)
        df = fn(df)
        report.append({"filter": name, "before": before, "removed": before - len(df), "after": len(df)})
        if len(df) == 0:
            trail = ", ".join(f"{r['filter']} -{r['removed']}" for r in report)
            raise NothingSurvivedError(
                f"no samples survived filtering: filter {name!r} removed the last {before} of "
                f"{report[0]['before']} samples (removed per filter: {trail})",
                report,
            )
    return df, report


__all__ = [
    "NothingSurvivedError",
    "REWARD_TOLERANCE",
    "apply_filters",
    "enabled_filters",
    "filter_best_of_n",
    "filter_dedupe",
    "filter_format",
    "filter_length",
    "filter_max_per_prompt",
    "filter_pass_rate",
    "filter_reward",
    "normalize_completion",
]
