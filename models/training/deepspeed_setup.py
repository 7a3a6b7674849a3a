"""The DeepSpeed side of the loop: the stage's JSON merged with its batch and precision settings,
what AdamW optimizes (trainable parameters only), the state dict a checkpoint holds for a model with
frozen weights, and DeepSpeed defaults trimmed where they cost time or memory and change no number."""

from __future__ import annotations

import functools
import json

import torch

from models.recipes.train_config import TrainConfig, deepspeed_json


def deepspeed_config(train: TrainConfig) -> dict:
    """The DeepSpeed JSON named by the stage, merged with the stage's batch/precision settings."""
    cfg = json.loads(deepspeed_json(train.deepspeed).read_text())
    cfg["train_micro_batch_size_per_gpu"] = train.micro_batch_size
    cfg["gradient_accumulation_steps"] = train.grad_accum
    cfg["train_batch_size"] = train.batch_size
    cfg["gradient_clipping"] = train.max_grad_norm
    cfg.setdefault("steps_per_print", 10**9)
    if train.zero_stage is not None:
        cfg.setdefault("zero_optimization", {})["stage"] = train.zero_stage
    if train.precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    else:
        cfg.pop("bf16", None)
        cfg.pop("fp16", None)
    return cfg

def trim_engine(engine, world: int) -> None:
    """DeepSpeed defaults that cost time or memory here and change no number:

    * ZeRO-0 on one process: after every backward the engine flattens every gradient, all-reduces it
      over a group of one, and copies it back. There is nothing to reduce: that pass is turned off. Its fp32 gradient clipping
      takes one norm per parameter, an all-reduce over the group of one and a multiply of every
      gradient even when the factor is 1: `_clip_one_rank` computes the same norm (bitwise) in one
      foreach call and multiplies only when the clip bites.
    * ZeRO-3 in fp32: DeepSpeed means to use a parameter partition that already is fp32 on the
      optimizer's device as its own fp32 master, but its check compares a torch.device with the
      accelerator's device *name* (a str), which never holds, so every rank keeps a second copy of
      its partition. Where partition and master have the same dtype, device and size, the master is
      made to share the partition's storage again (the two always hold equal values anyway).
    """
    stage = engine.zero_optimization_stage()
    if world == 1 and stage == 0:
        engine.enable_backward_allreduce = False
        engine.clip_fp32_gradients = functools.partial(_clip_one_rank, engine)
    opt = engine.optimizer
    if stage == 3 and not getattr(opt, "offload_optimizer", False):
        low = getattr(opt, "fp16_partitioned_groups_flat", None) or []
        high = getattr(opt, "fp32_partitioned_groups_flat", None) or []
        for lp, hp in zip(low, high):
            if (lp is not None and hp is not lp and lp.dtype == hp.dtype and lp.device == hp.device
                    and lp.shape == hp.shape and lp.untyped_storage().data_ptr() != hp.untyped_storage().data_ptr()):
                hp.data = lp.data

def _clip_one_rank(engine) -> None:
    """deepspeed.runtime.utils.clip_grad_norm_ for one rank without model parallelism: the 2-norm of
    the per-parameter 2-norms (the same per-tensor norms, ``torch._foreach_norm``), and the gradients
    scaled by min(1, max_norm / (norm + 1e-6)), skipped when that is exactly 1."""
    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
    if not grads:
        return
    norms = torch._foreach_norm([g.detach().float() for g in grads], 2.0)
    total = torch.stack(norms).pow(2.0).sum().float().pow(1.0 / 2.0)
    # tensor / tensor as DeepSpeed does (a Python float / tensor is a reciprocal times the float: other bits)
    coef = torch.tensor([float(engine.gradient_clipping())], device=total.device) / (total + 1e-6)
    coef = torch.min(torch.tensor([1.0], device=coef.device), coef)
    if coef.item() < 1.0:
        torch._foreach_mul_(grads, coef.to(grads[0].dtype).squeeze(0))

def trainable_param_groups(model: torch.nn.Module, params: list | None) -> list:
    """What AdamW optimizes: `params` (tensors or param-group dicts) or every parameter of `model`,
    keeping only those that require grad (frozen ones would take optimizer state and, under ZeRO-1/2,
    a share of the flat fp32 partitions)."""
    if params is None:
        return [p for p in model.parameters() if p.requires_grad]
    out = []
    for g in params:
        if isinstance(g, dict):
            out.append({**g, "params": [p for p in g["params"] if p.requires_grad]})
        elif g.requires_grad:
            out.append(g)
    return out

def trainable_state_dict(engine, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
    """DeepSpeedEngine.module_state_dict for a model with frozen weights: the module's state dict
    without any frozen parameter. DeepSpeed's own `exclude_frozen_parameters` looks the frozen ones up
    in `named_parameters()`, which lists a tied weight once, so a frozen tied LM head (`lm_head.weight`,
    the embedding matrix) would stay in every checkpoint; here every name of a frozen tensor goes."""
    sd = engine.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
    for n, p in engine.module.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            sd.pop(prefix + n, None)
    return sd


def hold_fp32_values(model: torch.nn.Module) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """The fp32 values of the trainable parameters, taken before `deepspeed.initialize` casts the
    model to bf16 (for `seed_fp32_masters`). A tensor on the CPU is held, not copied (DeepSpeed gives
    the parameter a new bf16 tensor and the fp32 one lives on here); one on an accelerator is copied to
    host memory so that the device does not hold both precisions at once."""
    held = []
    for p in model.parameters():
        if p.requires_grad and p.dtype == torch.float32:
            v = p.detach()
            held.append((p, v if v.device.type == "cpu" else v.to("cpu")))
    return held


def seed_fp32_masters(engine, held: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> int:
    """Make the optimizer's fp32 master weights the model's own fp32 values. Returns how many
    parameters were set.

    With `bf16.enabled` DeepSpeed (0.19.8) casts the parameters to bf16 first and then builds the fp32
    masters from those bf16 copies, on every ZeRO stage. Two things follow: the checkpoint's low bits
    are gone for good, and every master starts exactly on a bf16 value, so an update smaller than
    half a bf16 step (lr 1e-5 on a weight of 0.05 is ~1/10 of one) leaves the bf16 weight unchanged
    until ~10 such updates have piled up: the first steps of a fine-tune barely move the model
    (docs/real-models.md, 'bf16'). Mixed precision as PyTorch defines it keeps the fp32 weights as
    the masters; this puts them there. ZeRO-0's wrapper (`FP16_UnfusedOptimizer`) also runs one
    AdamW step on zero gradients while it is built, which counts as Adam's step 1 (the first real
    update is then 0.74 of Adam's) and applies weight decay once: that state is dropped too, so the
    first real step is AdamW's step 1. Call before loading a checkpoint, which restores its own
    masters and state.
    """
    if not held:
        return 0
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer
    from deepspeed.utils import safe_set_full_fp32_param

    opt = engine.optimizer
    values = {id(p): v for p, v in held}
    n = 0
    if isinstance(opt, FP16_UnfusedOptimizer):
        for low_group, high_group in zip(opt.fp16_groups, opt.fp32_groups):
            for low, high in zip(low_group, high_group):
                v = values.get(id(low))
                if v is not None:
                    high.data.copy_(v)
                    n += 1
        opt.optimizer.state.clear()
        return n
    for p, v in held:
        if hasattr(p, "ds_id") or getattr(p, "_hp_mapping", None) is not None:
            safe_set_full_fp32_param(p, v)
            n += 1
    return n
