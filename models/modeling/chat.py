"""Prompts as the model sees them: plain text or a conversation rendered with the chat template.

The one place where a prompt becomes token ids. SFT, RL rollouts (GRPO, PPO), on-policy DPO pairs,
the reward model, rejection sampling and evaluation all call `encode_prompt`, so an instruct model is
trained and sampled on the same ids, in its own format.

A prompt is either a string or a conversation in TRL's format (a list of ``{"role", "content"}``
turns, ending with the user's turn). The `chat_template` setting of a stage decides how it renders:

- ``"auto"``: through the tokenizer's chat template with the generation prompt
  (``apply_chat_template(add_generation_prompt=True)``, as TRL renders conversational data in every
  trainer); a string is the one user turn ``[{"role": "user", "content": prompt}]``, so a string and
  its one-message form give the same ids. A tokenizer without a template takes strings as written.
- ``"never"``: the string as written; a conversation is an error (there is no format to put it in).
- ``None`` (a stage config used outside a recipe): conversations through the template, strings as
  written, which is TRL's own rule.

The completion of a templated prompt ends with the template's end-of-turn token (``<|im_end|>`` in
ChatML, ``<|eot_id|>`` in Llama 3), found by rendering a probe conversation, so SFT trains the model
to stop where the sampler stops it.
"""

from __future__ import annotations

from typing import Any, Literal

ChatTemplate = Literal["auto", "never"]
CHAT_TEMPLATE_HELP = (
    "'auto': render prompts with the tokenizer's chat template and its generation prompt (a string "
    "prompt is one user turn; TRL renders conversational data so in every trainer); 'never': the prompt "
    "text as written (a conversation is then an error); unset: the recipe's top-level `chat_template`"
)


def as_messages(prompt: Any) -> list[dict] | None:
    """The conversation a prompt holds (a list of turns, from JSON or Parquet), or None for text."""
    if isinstance(prompt, str) or prompt is None:
        return None
    if hasattr(prompt, "tolist"):  # a numpy array of turns, as pandas reads Parquet lists
        prompt = prompt.tolist()
    if isinstance(prompt, (list, tuple)):
        return [dict(turn) for turn in prompt]
    raise TypeError(f"a prompt is a string or a list of messages, got {type(prompt).__name__}")


def has_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def uses_template(tokenizer, prompt: Any, mode: ChatTemplate | None) -> bool:
    """Whether `prompt` is rendered with the chat template under `mode` (see the module docstring)."""
    if as_messages(prompt) is not None:
        return mode != "never"
    return mode == "auto" and has_template(tokenizer)


def render_prompt(tokenizer, prompt: Any, mode: ChatTemplate | None) -> str:
    """The text the model reads before its completion."""
    messages = as_messages(prompt)
    if messages is None:
        if not uses_template(tokenizer, prompt, mode):
            return prompt
        messages = [{"role": "user", "content": prompt}]
    elif mode == "never":
        raise ValueError("chat_template is 'never' but the prompt is a conversation (a list of messages)")
    if not has_template(tokenizer):
        raise ValueError(
            f"the prompt is a conversation but the tokenizer ({getattr(tokenizer, 'name_or_path', '?')}) "
            "has no chat template"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_text(tokenizer, text: str) -> list[int]:
    """Ids of a rendered prompt with the tokenizer's BOS exactly once: added by the tokenizer unless
    the text already starts with it (chat templates often render it themselves)."""
    bos = tokenizer.bos_token
    add_special = not (bos and text.startswith(bos))
    return list(tokenizer(text, add_special_tokens=add_special)["input_ids"])


def encode_prompt(tokenizer, prompt: Any, mode: ChatTemplate | None) -> list[int]:
    """Prompt ids as every stage feeds them to the model."""
    return encode_text(tokenizer, render_prompt(tokenizer, prompt, mode))


def problem_prompt_ids(tokenizer, mode: ChatTemplate | None):
    """`ids(problem)`: `encode_prompt` of a problem's prompt, memoised on its ``id`` (RL stages draw
    the same problems epoch after epoch)."""
    memo: dict[str, list[int]] = {}

    def ids(problem: dict) -> list[int]:
        key = str(problem["id"])
        if key not in memo:
            memo[key] = encode_prompt(tokenizer, problem["prompt"], mode)
        return memo[key]

    return ids


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with, or None when it has no template or
    the token cannot be found. A probe conversation is rendered and the first token after the
    assistant's text is taken when it is one of the tokenizer's added tokens (``<|im_end|>``,
    ``<|eot_id|>``, ``<end_of_turn>``, an ``eos``)."""
    if not has_template(tokenizer):
        return None
    marker = "posttrain-probe-7c1d"
    try:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False
        )
    except Exception:  # noqa: BLE001 - a template that refuses the probe (role rules): no end-of-turn
        return None
    tail = text[text.find(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(tail, add_special_tokens=False)["input_ids"] if tail else []
    added = set(getattr(tokenizer, "added_tokens_encoder", {}).values()) | set(tokenizer.all_special_ids)
    return int(ids[0]) if ids and ids[0] in added else None


def completion_end(tokenizer, mode: ChatTemplate | None):
    """`end(prompt)`: the token that ends a completion of `prompt` in training data: the template's
    end-of-turn token for a templated prompt, else (or when the template has none) the tokenizer's
    EOS. The template is probed once, not per example."""
    eos, eot = tokenizer.eos_token_id, end_of_turn_id(tokenizer)

    def end(prompt: Any) -> int | None:
        return eot if eot is not None and uses_template(tokenizer, prompt, mode) else eos

    return end


def encode_completion(tokenizer, completion: str, end_id: int | None) -> list[int]:
    """Completion ids followed by the end token (when there is one)."""
    return list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + ([end_id] if end_id is not None else [])


def prompt_text(prompt: Any) -> str:
    """A plain-text view of a prompt for rewards and logs: the string, or a conversation's turns'
    contents joined by blank lines."""
    messages = as_messages(prompt)
    if messages is None:
        return "" if prompt is None else str(prompt)
    return "\n\n".join(str(m.get("content", "")) for m in messages)


def completion_content(value: Any) -> str:
    """A completion as text: a string, or TRL's conversational form (a list holding one assistant
    turn) reduced to that turn's content."""
    messages = as_messages(value)
    if messages is None:
        return value
    return "".join(str(m.get("content", "")) for m in messages)


__all__ = [
    "CHAT_TEMPLATE_HELP", "ChatTemplate", "as_messages", "completion_content", "completion_end",
    "encode_completion", "encode_prompt", "encode_text", "end_of_turn_id", "has_template", "problem_prompt_ids",
    "prompt_text",
    "render_prompt", "uses_template",
]
