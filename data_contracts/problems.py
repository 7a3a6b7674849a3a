"""Problems with reference answers: what RL, sampling and evaluation read.

Columns: ``id`` (unique string), ``prompt`` and ``answer`` (non-empty strings), optionally
``solution`` (a string; the SFT completion when the task has one).
"""

from __future__ import annotations

import pandas as pd

from data_contracts.schema import Field, string, text, validate_frame

FIELDS = (
    Field("id", text, unique=True),
    Field("prompt", text),
    Field("answer", text),
    Field("solution", string, nullable=True, required=False),
)


def validate_problems(df: pd.DataFrame, source: str) -> pd.DataFrame:
    return validate_frame(df, source, FIELDS)
