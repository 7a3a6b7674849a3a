"""The causal-LM objective of pretraining, SFT and refine: right-padded (input_ids, labels) batches and
the token-mean next-token NLL over the *global* batch (see models/training/engine.py for the loss_scale
convention), computed with the padding-free forward of models/training/packing.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from models.training.batching import pad_right
from models.modeling.device import device_of, to_device
from models.training.engine import StepContext
from models.training.packing import packed_logits, predicting

IGNORE = -100


def collate(examples: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example; labels are IGNORE on padding."""
    input_ids, attn = pad_right([ids for ids, _ in examples], pad_id)
    labels, _ = pad_right([lab for _, lab in examples], IGNORE)
    return {"input_ids": input_ids, "attention_mask": attn, "labels": labels}


def n_label_tokens(examples) -> int:
    """Tokens that carry loss (the label at position t is predicted from t-1, so skip position 0)."""
    return sum(sum(1 for x in lab[1:] if x != IGNORE) for _, lab in examples)


def causal_lm_nll_sum(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over label positions that are not IGNORE, and their count.

    Only the positions that predict a label get logits (`packed_logits(keep=...)`): with SFT's
    completion-only labels and a 49k-token vocabulary, the prompt positions' LM head and their
    (B, T, V) logits are most of what a step would otherwise spend outside the transformer."""
    shift_labels = batch["labels"][:, 1:]
    predicts = shift_labels != IGNORE
    logits = packed_logits(model, batch["input_ids"], batch["attention_mask"], keep=predicting(predicts))  # (K, V)
    nll = F.cross_entropy(logits.float(), shift_labels[predicts], reduction="sum")
    return nll, int(predicts.sum())


def lm_step_fn(pad_id: int):
    """Token-mean NLL over the global batch (see models/training/engine.py for the loss_scale convention)."""

    def step(engine, chunk, ctx: StepContext):
        total = max(1, n_label_tokens(ctx.global_batch))
        nll, n = causal_lm_nll_sum(engine, to_device(collate(chunk, pad_id), device_of(engine)))
        contribution = nll / total
        return contribution * ctx.loss_scale, {"loss": contribution.item(), "tokens": n}

    return step
