"""Scored samples from rejection sampling: what the filter stage reads.

Each named reward is a ``reward/<name>`` column (nullable: None = could not judge) and ``total``
is their combination; any number of reward columns may be present. ``prompt`` keeps the problem's
form (a string or a conversation), so the refine stage renders it exactly as it was sampled.
"""

from __future__ import annotations

import pandas as pd

from data_contracts.messages import prompt_problem
from data_contracts.schema import FINISH_REASONS, Field, integer, one_of, real, string, text, validate_frame

REWARD_PREFIX = "reward/"

FIELDS = (
    Field("prompt_id", text),
    Field("prompt", prompt_problem),
    Field("completion", string),
    Field("total", real),
    Field("length", integer(minimum=0)),
    Field("finish_reason", one_of(*FINISH_REASONS)),
    Field(REWARD_PREFIX + ".+", real, nullable=True, required=False, regex=True),
)


def reward_columns(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if isinstance(c, str) and c.startswith(REWARD_PREFIX)]


def validate_samples(df: pd.DataFrame, source: str) -> pd.DataFrame:
    return validate_frame(df, source, FIELDS)
