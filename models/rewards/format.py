"""Format reward: is the completion exactly ``<think>…</think><answer>…</answer>``?

The R1-Zero template (DeepSeek-AI 2025, table 1): reasoning inside ``<think>``, the final answer
inside ``<answer>``. Whitespace is allowed around and between the two blocks; the think block may
span lines (and may be empty); the answer must hold something other than whitespace; each tag
appears exactly once; nothing but whitespace may follow ``</answer>``. It does not judge whether
the answer is right (that is the ``math``/``code``/``builtin_task`` rewards' job).
"""

from __future__ import annotations

import re

from models.rewards import register_reward

_TEMPLATE = re.compile(r"\s*<think>(.*?)</think>\s*<answer>(.*?)</answer>\s*", re.DOTALL)
_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def has_think_answer_format(completion: str) -> bool:
    """True iff ``completion`` is one think block then one non-empty answer block, nothing else."""
    if not isinstance(completion, str):
        return False
    if any(completion.count(tag) != 1 for tag in _TAGS):
        return False
    match = _TEMPLATE.fullmatch(completion)
    return match is not None and match.group(2).strip() != ""


@register_reward("format")
def format_reward(prompt: str, completion: str, reference: str) -> float:
    """1.0 for the exact ``<think>…</think><answer>…</answer>`` shape, else 0.0."""
    return 1.0 if has_think_answer_format(completion) else 0.0
