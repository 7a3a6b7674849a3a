"""Preference pairs in TRL's format: ``prompt``, ``chosen``, ``rejected``, with ``chosen`` different
from ``rejected`` (a pair that ties teaches nothing). Each is a non-empty string, or in TRL's
conversational form the prompt a conversation ending with the user's turn and chosen/rejected the
assistant's turn (data_contracts/messages.py)."""

from __future__ import annotations

import pandas as pd

from data_contracts.messages import completion_problem, prompt_problem
from data_contracts.schema import Field, RowCheck, require_rows, validate_frame

FIELDS = (Field("prompt", prompt_problem), Field("chosen", completion_problem), Field("rejected", completion_problem))


def _same_pair(row: pd.Series) -> str | None:
    chosen, rejected = row["chosen"], row["rejected"]
    if type(chosen) is type(rejected) and repr(chosen) == repr(rejected):
        return "same text as 'chosen'"
    return None


ROW_CHECKS = (RowCheck("chosen_differs", "rejected", ("chosen", "rejected"), _same_pair),)


def validate_preferences(df: pd.DataFrame, source: str) -> pd.DataFrame:
    require_rows(df, source)
    return validate_frame(df, source, FIELDS, ROW_CHECKS)
