"""Pretrain recipe: the built-in tiny Llama on the built-in corpus (Stage 1 of `builtin:tiny`).

Documents are packed whole into fixed-length blocks (never split, so every block starts with a BOS,
which the prototype found the model needs to lock onto), trained with plain next-token loss on the
same engine loop as every other stage. With ``packing: documents`` each document is its own example
instead: it attends only to itself (document masking), and the trainer's padding-free layouts
(models/training/packing.py) pack the documents of a micro-batch into rows without padding.
"""

from __future__ import annotations

from models.data import builtin_task
from models.config import PretrainConfig, TaskConfig
from models.training.engine import run_loop
from models.modeling.lora import prepare_backbone
from models.training.batching import EpochSampler
from models.training.lm_loss import lm_step_fn
from models.modeling.tiny_model import build_tiny_model, save_hf
from models.modeling.tokenizer import build_tokenizer


def document_examples(docs: list[str], tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Each document its own `BOS doc EOS` example, cut at seq_len (``packing: documents``)."""
    eos = tokenizer.eos_token_id
    out = []
    for ids in tokenizer(docs)["input_ids"]:
        seq = (ids + [eos])[:seq_len]
        out.append((seq, list(seq)))
    return out


def pack_documents(docs: list[str], tokenizer, seq_len: int) -> list[tuple[list[int], list[int]]]:
    """Greedy-fill blocks of at most seq_len tokens with whole `BOS doc EOS` sequences."""
    blocks, cur = [], []
    for ids, _ in document_examples(docs, tokenizer, seq_len):
        if len(cur) + len(ids) > seq_len:
            blocks.append((cur, list(cur)))
            cur = []
        cur = cur + ids
    if cur:
        blocks.append((cur, list(cur)))
    return blocks


def corpus(task: TaskConfig) -> list[str]:
    _, test = builtin_task.make_problems(task.seed, 1, task.n_test, task.min_operands, task.max_operands)
    return builtin_task.pretrain_corpus(
        task.seed, task.pretrain_docs, {p.question for p in test}, task.worked_fraction,
        task.min_operands, task.max_operands, check_fraction=task.check_fraction,
        worked_after_question=task.worked_after_question, guess_accuracy=task.guess_accuracy,
    )


def train_pretrain(spec: dict, on_log=None, after_step=None) -> dict:
    """spec: config (PretrainConfig dict), task (TaskConfig dict), workdir. after_step(engine, step):
    called after every optimizer step (benchmarks/probe_r1_zero_base.py evaluates the base there)."""
    import torch

    cfg = PretrainConfig.model_validate(spec["config"])
    task = TaskConfig.model_validate(spec["task"])
    tokenizer = build_tokenizer()
    model = build_tiny_model(
        tokenizer, seed=cfg.seed, hidden_size=cfg.hidden_size, num_layers=cfg.num_layers,
        num_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
        max_position_embeddings=cfg.max_position_embeddings,
    )
    prepare_backbone(model, cfg)  # gradient checkpointing if asked (PretrainConfig refuses lora)
    torch.manual_seed(cfg.seed)
    make = pack_documents if cfg.packing == "blocks" else document_examples
    blocks = make(corpus(task), tokenizer, cfg.seq_len)
    sampler = EpochSampler(len(blocks), cfg.seed)

    def global_batch(step: int):
        return [blocks[i] for i in sampler.indices(step * cfg.batch_size, cfg.batch_size)]

    def save(module, out):
        save_hf(module, tokenizer, out)

    res = run_loop(model, cfg, spec["workdir"], global_batch, lm_step_fn(tokenizer.pad_token_id), save, on_log=on_log,
                   after_step=after_step)
    return {
        "output_dir": res.output_dir, "final_step": res.final_step,
        "resumed_from_step": res.resumed_from_step, "already_done": res.already_done,
        "metrics_path": res.metrics_path, "last_metrics": res.last_metrics,
        "num_blocks": len(blocks), "num_params": sum(p.numel() for p in model.parameters()),
    }
