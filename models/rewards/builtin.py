"""The built-in task's verifier as a reward: ``models.data.builtin_task.verify`` behind the reward API.

It adds nothing to the verifier's judgement; it only guarantees the reward contract (a float or
``None``, never an exception on model output). The task module is imported on first call so that
registering rewards does not build the task.
"""

from __future__ import annotations

import importlib
import logging

from models.rewards import register_reward

logger = logging.getLogger(__name__)


@register_reward("builtin_task")
def builtin_task_reward(prompt: str, completion: str, reference: str) -> float | None:
    """``models.data.builtin_task.verify(prompt, completion, reference)`` as a float, None = unjudged."""
    return _judge("verify", prompt, completion, reference)


@register_reward("builtin_task_lenient")
def builtin_task_lenient_reward(prompt: str, completion: str, reference: str) -> float | None:
    """``models.data.builtin_task.verify_lenient``: also answers a base model gives in free form."""
    return _judge("verify_lenient", prompt, completion, reference)


def _judge(fn_name: str, prompt: str, completion: str, reference: str) -> float | None:
    try:
        verify = getattr(importlib.import_module("models.data.builtin_task"), fn_name)
    except ImportError:
        logger.exception("models.data.builtin_task is not importable; builtin_task reward is None")
        return None
    try:
        value = verify(prompt, completion, reference)
    except Exception:  # the verifier must not raise on model output; if it does, say so loudly
        logger.exception("models.data.builtin_task.verify raised; scoring the sample None")
        return None
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        logger.error("models.data.builtin_task.verify returned %r, not a number", value)
        return None
