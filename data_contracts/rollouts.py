"""RL rollouts as a table (for logging and inspection, one row per completion)."""

from __future__ import annotations

import pandas as pd

from data_contracts.schema import Field, integer, real, string, text, validate_frame

FIELDS = (
    Field("prompt_id", text),
    Field("prompt", text),
    Field("completion", string),
    Field("reward", real),
    Field("advantage", real),
    Field("length", integer(minimum=0)),
)


def validate_rollouts(df: pd.DataFrame, source: str) -> pd.DataFrame:
    return validate_frame(df, source, FIELDS)
