"""SFT datasets in TRL's two formats.

- prompt/completion: ``prompt`` and ``completion``, non-empty strings; the loss is on the completion.
- conversational: ``messages``, a non-empty list of ``{"role", "content"}`` turns with roles
  system/user/assistant and non-empty content, ending with an assistant turn.
"""

from __future__ import annotations

import os
from typing import Any, Literal

import numpy as np
import pandas as pd

from data_contracts.errors import ContractError
from data_contracts.io import read_table
from data_contracts.schema import Field, text, validate_frame

SftFormat = Literal["prompt_completion", "messages"]
ROLES = ("system", "user", "assistant")


def messages_problem(v: Any) -> str | None:
    """Why a ``messages`` cell is not a valid conversation, or None."""
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if not isinstance(v, (list, tuple)):
        return f"expected a list of messages, got {type(v).__name__}"
    if not v:
        return "empty conversation"
    for i, turn in enumerate(v, start=1):
        if not isinstance(turn, dict):
            return f"turn {i}: expected an object with 'role' and 'content', got {type(turn).__name__}"
        role, content = turn.get("role"), turn.get("content")
        if role is None:
            return f"turn {i}: missing 'role'"
        if role not in ROLES:
            return f"turn {i}: unknown role {role!r} (want one of {', '.join(ROLES)})"
        if content is None:
            return f"turn {i}: missing 'content'"
        if not isinstance(content, str):
            return f"turn {i}: content must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"turn {i}: empty content"
    roles = [turn["role"] for turn in v]
    if "assistant" not in roles:
        return "no assistant turn"
    if roles[-1] != "assistant":
        return f"last turn is {roles[-1]!r}, must be 'assistant'"
    return None


PROMPT_COMPLETION_FIELDS = (Field("prompt", text), Field("completion", text))
MESSAGES_FIELDS = (Field("messages", messages_problem),)


def detect_sft_format(df: pd.DataFrame, source: str = "<dataframe>") -> SftFormat:
    """``"messages"`` if there is a messages column, ``"prompt_completion"`` if there is a prompt
    or completion column (a missing partner is then reported by validation); else ContractError."""
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
