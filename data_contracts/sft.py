"""SFT datasets in TRL's two formats.

- prompt/completion: ``prompt`` and ``completion``; the loss is on the completion. Each is a non-empty
  string, or (TRL's conversational prompt/completion) the prompt a conversation ending with the
  user's turn and the completion the assistant's turn(s) (data_contracts/messages.py).
- conversational: ``messages``, a non-empty list of ``{"role", "content"}`` turns with roles
  system/user/assistant and non-empty content, ending with an assistant turn.
"""

from __future__ import annotations

import os
from typing import Literal

import pandas as pd

from data_contracts.errors import ContractError
from data_contracts.io import read_table
from data_contracts.messages import completion_problem, messages_problem, prompt_problem
from data_contracts.schema import Field, require_rows, validate_frame

SftFormat = Literal["prompt_completion", "messages"]


PROMPT_COMPLETION_FIELDS = (Field("prompt", prompt_problem), Field("completion", completion_problem))
MESSAGES_FIELDS = (Field("messages", messages_problem),)


def detect_sft_format(df: pd.DataFrame, source: str = "<dataframe>") -> SftFormat:
    """``"messages"`` if there is a messages column, ``"prompt_completion"`` if there is a prompt
    or completion column (a missing partner is then reported by validation); else ContractError."""
    require_rows(df, source)
    if "messages" in df.columns:
        return "messages"
    if "prompt" in df.columns or "completion" in df.columns:
        return "prompt_completion"
    raise ContractError(
        source, None, None, f"not an SFT dataset: want 'prompt'+'completion' or 'messages' columns, got {list(df.columns)}"
    )


def validate_sft(df: pd.DataFrame, source: str) -> pd.DataFrame:
    fmt = detect_sft_format(df, source)
    return validate_frame(df, source, MESSAGES_FIELDS if fmt == "messages" else PROMPT_COMPLETION_FIELDS)


def load_sft_dataset(path: str | os.PathLike) -> tuple[pd.DataFrame, SftFormat]:
    """Read and validate an SFT file; returns the frame and its format."""
    source = str(path)
    df = read_table(path)
    fmt = detect_sft_format(df, source)
    validate_sft(df, source)
    return df, fmt
