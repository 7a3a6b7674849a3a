"""Preference pairs in TRL's format: ``prompt``, ``chosen``, ``rejected`` (non-empty strings),
with ``chosen`` different from ``rejected`` (a pair that ties teaches nothing)."""

from __future__ import annotations

import pandas as pd

from data_contracts.schema import Field, RowCheck, text, validate_frame

FIELDS = (Field("prompt", text), Field("chosen", text), Field("rejected", text))


def _same_pair(row: pd.Series) -> str | None:
    if isinstance(row["chosen"], str) and row["chosen"] == row["rejected"]:
        return "same text as 'chosen'"
    return None


ROW_CHECKS = (RowCheck("chosen_differs", "rejected", ("chosen", "rejected"), _same_pair),)


def validate_preferences(df: pd.DataFrame, source: str) -> pd.DataFrame:
    return validate_frame(df, source, FIELDS, ROW_CHECKS)
