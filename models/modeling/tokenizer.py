"""The built-in character-level tokenizer, built with the `tokenizers` library.

One token per character, plus single tokens for the four format tags. It is wrapped as a
``transformers.PreTrainedTokenizerFast`` and saved in HF format, so every stage loads it exactly
like a downloaded tokenizer (``AutoTokenizer.from_pretrained``).

Every encoded sequence starts with ``<bos>``: the prototype of the built-in task found that without
a BOS at the start the model never locked onto the answer format (see DESIGN.md).
"""

from __future__ import annotations

import string

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
"""Ids 0..3 in this order; ``<pad>`` is id 0."""

FORMAT_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
"""Ordinary (not special) added tokens: ``decode(skip_special_tokens=True)`` keeps them."""

CHARACTERS = (
    string.digits
    + "+-=*/().,:?!"
    + " \n"
    + string.ascii_lowercase
    + string.ascii_uppercase
    + "\u2212"  # unicode minus: a model may meet it in real text; the verifier accepts it
)

# User turn -> "Q: {content}\nA:", assistant turn -> content + eos, system turn -> content + "\n".
# The template starts with bos_token because apply_chat_template(tokenize=True) encodes the rendered
# text with add_special_tokens=False (transformers' convention, as in Llama 3's template); the
# post-processor adds it for plain text instead. "A:" is already the generation prompt, so
# add_generation_prompt adds nothing.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}{{ '\\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'Q: ' }}{{ message['content'] }}{{ '\\nA:' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] }}{{ eos_token }}{% endgeneration %}"
    "{% else %}{{ raise_exception('unknown role: ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
)


def vocabulary() -> dict[str, int]:
    """token -> id: special tokens, then format tags, then one entry per character."""
    tokens = list(SPECIAL_TOKENS) + list(FORMAT_TOKENS) + list(CHARACTERS)
    assert len(set(tokens)) == len(tokens), "duplicate token in the vocabulary"
    return {tok: i for i, tok in enumerate(tokens)}


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A fresh character-level tokenizer (deterministic: same vocabulary and ids every call)."""
    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Each character is its own pre-token; [\s\S] also matches "\n", which "." would not.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    # Fuse joins tokens back without the spaces a WordLevel decode would insert.
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in FORMAT_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B:1",
        special_tokens=[(BOS, vocab[BOS])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        pad_token=PAD,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=256,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast
