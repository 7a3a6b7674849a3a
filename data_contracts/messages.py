"""Conversations in TRL's format, and the prompt and completion cells that may hold one.

A conversation is a non-empty list of ``{"role", "content"}`` turns with roles system/user/assistant
and non-empty string content. Where a dataset has a prompt, it may be a string or a conversation
that ends with the user's turn (the model answers next); a completion may be a string or the
assistant's turn(s) (TRL's conversational prompt/completion and preference formats).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from data_contracts.schema import text

ROLES = ("system", "user", "assistant")


def _as_list(v: Any) -> Any:
    return v.tolist() if isinstance(v, np.ndarray) else v


def turns_problem(v: Any, last_role: str | None = None, only_role: str | None = None) -> str | None:
    """Why `v` is not a conversation (whose last turn is `last_role`, whose every turn is
    `only_role`, when given), or None."""
    v = _as_list(v)
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
        if only_role is not None and role != only_role:
            return f"turn {i}: role {role!r}, a completion holds only '{only_role}' turns"
        if content is None:
            return f"turn {i}: missing 'content'"
        if not isinstance(content, str):
            return f"turn {i}: content must be a string, got {type(content).__name__}"
        if not content.strip():
            return f"turn {i}: empty content"
    if last_role is not None and v[-1]["role"] != last_role:
        return f"last turn is {v[-1]['role']!r}, must be '{last_role}'"
    return None


def messages_problem(v: Any) -> str | None:
    """Why a ``messages`` cell (a whole SFT conversation) is not valid, or None."""
    problem = turns_problem(v)
    if problem is not None:
        return problem
    roles = [turn["role"] for turn in _as_list(v)]
    if "assistant" not in roles:
        return "no assistant turn"
    if roles[-1] != "assistant":
        return f"last turn is {roles[-1]!r}, must be 'assistant'"
    return None


def prompt_problem(v: Any) -> str | None:
    """A prompt: non-empty text, or a conversation ending with the user's turn."""
    if isinstance(v, str):
        return text(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        return turns_problem(v, last_role="user")
    return f"expected a string or a list of messages, got {type(v).__name__}"


def completion_problem(v: Any) -> str | None:
    """A completion: non-empty text, or assistant turn(s)."""
    if isinstance(v, str):
        return text(v)
    if isinstance(v, (list, tuple, np.ndarray)):
        return turns_problem(v, only_role="assistant")
    return f"expected a string or a list of assistant messages, got {type(v).__name__}"
