"""The built-in tiny causal LM: a Llama-architecture model small enough to train on 2 CPU cores.

Defaults follow the prototype in DESIGN.md (hidden 192, 4 layers, 4 heads, MLP 512, tied
embeddings: ~1.8M parameters, ~10k training tokens/s in fp32 on 2 cores). It is saved in plain HF
format so every later stage loads it like a downloaded model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from models.data.builtin_task import PROMPT_TEMPLATE, STOP_STRINGS, TASK_VERSION

POSTTRAIN_JSON = "posttrain.json"


def tiny_config(
    vocab_size: int,
    hidden_size: int = 192,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 512,
    max_position_embeddings: int = 256,
    **overrides,
) -> LlamaConfig:
    """A LlamaConfig for the tiny model; ``overrides`` are any other LlamaConfig fields
    (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``rope_theta``, ...)."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        attention_dropout=0.0,
        dtype="float32",
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _special_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def build_tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0, **config_overrides) -> LlamaForCausalLM:
    """A freshly initialised fp32 tiny model; the same ``seed`` gives the same weights.

    The global torch RNG is left as it was (the init runs under a forked RNG state).
    """
    cfg = tiny_config(len(tokenizer), **{**_special_ids(tokenizer), **config_overrides})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    model.to(torch.float32)
    model.generation_config = generation_config(tokenizer)
    return model


def generation_config(tokenizer: PreTrainedTokenizerBase) -> GenerationConfig:
    """Sampling defaults that are *true* temperature-1 sampling.

    transformers defaults to ``top_k=50``; RL needs the log-probs of the distribution actually
    sampled from, so top_k is 0 and top_p 1. Generation stops on EOS and on ``</answer>``
    (the built-in task's answer ends there); greedy evaluation passes ``do_sample=False``.
    """
    answer_close = tokenizer.convert_tokens_to_ids("</answer>")
    eos = [tokenizer.eos_token_id]
    if isinstance(answer_close, int) and answer_close != tokenizer.unk_token_id:
        eos.append(answer_close)
    return GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
    )


def save_hf(model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerBase, out_dir: str | os.PathLike) -> Path:
    """Write model (safetensors), tokenizer, ``generation_config.json`` and ``posttrain.json``
    (prompt template, stop strings, task) into ``out_dir``. Not atomic: the caller writes into a
    temp dir and moves it into place."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = generation_config(tokenizer)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    meta = {
        "prompt_template": PROMPT_TEMPLATE,
        "stop_strings": list(STOP_STRINGS),
        "task": "builtin",
        "task_version": TASK_VERSION,
    }
    (out / POSTTRAIN_JSON).write_text(json.dumps(meta, indent=2) + "\n")
    return out
