"""Reward functions for RL, registered by name.

A reward function is ``(prompt: str, completion: str, reference: str) -> float | None``.
``None`` means "could not be judged" (an unparseable reference, a sandbox that would not start, a
timeout); it is never a silent 0. Reward functions never raise on model output, whatever it holds.

Built-in rewards (imported lazily, so importing this package does not pull in math-verify/sympy):

- ``math``: final-answer equivalence with math-verify (`models/rewards/math.py`)
- ``format``: ``<think>…</think><answer>…</answer>`` shape (`models/rewards/format.py`)
- ``code``: model-written Python + reference asserts in a sandbox (`models/rewards/code_sandbox.py`)
- ``builtin_task``: the built-in task's verifier (`models/rewards/builtin.py`)
- ``builtin_task_lenient``: the same, also judging answers given without the tags (R1-Zero from a base)

What this is not: a place for learned reward models (those are trained by the reward_model stage).
"""

from __future__ import annotations

import importlib
import logging
from typing import Callable

RewardFn = Callable[[str, str, str], "float | None"]

logger = logging.getLogger(__name__)

# name -> module that registers it on import; resolved on first use only.
_LAZY: dict[str, str] = {
    "math": "models.rewards.math",
    "format": "models.rewards.format",
    "code": "models.rewards.code_sandbox",
    "builtin_task": "models.rewards.builtin",
    "builtin_task_lenient": "models.rewards.builtin",
}
_REGISTRY: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: register ``fn`` under ``name``. Re-registering a name replaces it."""

    def decorate(fn: RewardFn) -> RewardFn:
        _REGISTRY[name] = fn
        return fn

    return decorate


def _known_names() -> tuple[str, ...]:
    return tuple(sorted(set(_LAZY) | set(_REGISTRY)))


def __getattr__(attr: str):
    # REWARD_NAMES is computed on access so rewards registered later are listed too.
    if attr == "REWARD_NAMES":
        return _known_names()
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


def get_reward(name: str) -> RewardFn:
    """The reward function registered as ``name``; ValueError listing the known names otherwise."""
    if name not in _REGISTRY and name in _LAZY:
        importlib.import_module(_LAZY[name])
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(
            f"unknown reward {name!r}; known rewards: {', '.join(_known_names())}"
        ) from None


def _call_safely(name: str, fn: RewardFn, prompt: str, completion: str, reference: str):
    try:
        value = fn(prompt, completion, reference)
    except Exception:  # a reward must never take down a rollout; None = not judged
        logger.exception("reward %r raised; scoring it None", name)
        return None
    return None if value is None else float(value)


def combine_rewards(
    weights: dict[str, float],
) -> Callable[[str, str, str], tuple[float | None, dict[str, float | None]]]:
    """A reward that is the weighted sum of named rewards.

    The returned callable gives ``(total, parts)``: ``parts[name]`` is each reward's own value
    (``None`` kept as ``None``, so callers can count unjudged samples); ``total`` is
    ``sum(weights[name] * parts[name])`` with ``None`` parts counted as 0, and is itself ``None``
    only when *every* part is ``None`` (nothing could be judged at all). Unknown names fail here,
    at construction, not mid-rollout.
    """
    if not weights:
        raise ValueError("combine_rewards needs at least one reward name")
    fns = {name: get_reward(name) for name in weights}

    def combined(prompt: str, completion: str, reference: str):
        parts = {
            name: _call_safely(name, fn, prompt, completion, reference) for name, fn in fns.items()
        }
        if all(value is None for value in parts.values()):
            return None, parts
        total = sum(weights[name] * (value or 0.0) for name, value in parts.items())
        return total, parts

    return combined


__all__ = ["RewardFn", "register_reward", "get_reward", "combine_rewards", "REWARD_NAMES"]
