"""Problems with reference answers: what RL, sampling and evaluation read.

Columns: ``id`` (unique string), ``prompt`` (a non-empty string, or a conversation in TRL's format
ending with the user's turn: data_contracts/messages.py), ``answer`` (a non-empty string), optionally
``solution`` (a string; the SFT completion when the task has one).
"""

from __future__ import annotations

import pandas as pd

from data_contracts.messages import prompt_problem
from data_contracts.schema import Field, require_rows, string, text, validate_frame

FIELDS = (
    Field("id", text, unique=True),
    Field("prompt", prompt_problem),
    Field("answer", text),
    Field("solution", string, nullable=True, required=False),
)


def validate_problems(df: pd.DataFrame, source: str) -> pd.DataFrame:
    require_rows(df, source)
    return validate_frame(df, source, FIELDS)
