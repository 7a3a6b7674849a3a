"""The one training loop: every stage that trains (pretrain, SFT, reward model, DPO, GRPO, PPO) runs here.

The algorithm supplies the global batch for a step and a function that turns one micro-batch into a
loss; this loop owns the DeepSpeed engine: `engine.backward`, `engine.step`, checkpoints every N
steps, resume from the newest checkpoint (checking that the step counter and the data position
continue), per-step metrics, and consolidation of the final weights into a Hugging Face directory.

Batch layout (what makes world sizes and accumulation interchangeable): the global batch of a step
is a list of `batch_size` items; micro-step m on rank r takes chunk `m * world_size + r` of size
`micro_batch_size`. One process with accumulation 2 and two processes with accumulation 1 see the
same chunks and so compute the same gradient.

Loss convention: `step_fn` returns (loss_for_backward, metrics). DeepSpeed divides by the
accumulation steps and averages gradients over ranks, so a step_fn that wants the exact gradient of a
*global* quantity (e.g. the token mean over the whole global batch) returns
`contribution * ctx.loss_scale`, where `contribution` is its chunk's share of the global value.
Metrics are such additive contributions too: the loop sums them over micro-steps and ranks.
"""

from __future__ import annotations

import functools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from models.recipes.train_config import TrainConfig
from models.training.checkpoints import (checkpoint_tag, commit_checkpoint, consolidate, latest_checkpoint_step,
                                         prune_checkpoints)
from models.training.deepspeed_setup import (
    deepspeed_config,
    hold_fp32_values,
    seed_fp32_masters,
    trainable_param_groups,
    trainable_state_dict,
    trim_engine,
)
from models.training.distributed import barrier, ensure_distributed_env, rank_world
from models.training.faults import fault_point


@dataclass
class StepContext:
    step: int
    micro_step: int
    rank: int
    world_size: int
    grad_accum: int
    global_batch: list
    loss_scale: float  # grad_accum * world_size (undoes DeepSpeed's averaging)


@dataclass
class LoopResult:
    output_dir: str
    final_step: int
    resumed_from_step: int | None
    metrics_path: str
    last_metrics: dict[str, float] = field(default_factory=dict)
    already_done: bool = False


def loop_result(res, **extra) -> dict:
    """The recipe's return dict: the keys train_sft returns, plus stage-specific ones."""
    return {
        "output_dir": res.output_dir, "final_step": res.final_step,
        "resumed_from_step": res.resumed_from_step, "already_done": res.already_done,
        "metrics_path": res.metrics_path, "last_metrics": res.last_metrics, **extra,
    }


class ResumeError(RuntimeError):
    """A checkpoint that does not continue where its run left off."""


# ----------------------------------------------------------------------------- distributed set-up


# ----------------------------------------------------------------------------- schedule


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """Linear warm-up then cosine to min_lr_ratio (nanoGPT's schedule) or constant."""

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        if cfg.lr_schedule == "constant":
            return 1.0
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


# ----------------------------------------------------------------------------- the loop


def run_loop(
    model: torch.nn.Module,
    cfg: TrainConfig,
    workdir: str | os.PathLike,
    global_batch: Callable[[int], list],
    step_fn: Callable[[Any, list, StepContext], tuple[torch.Tensor, dict[str, float]]],
    save_model: Callable[[torch.nn.Module, Path], None],
    *,
    on_log: Callable[[dict], None] | None = None,
    after_step: Callable[[Any, int], None] | None = None,
    params: list | None = None,
) -> LoopResult:
    """Train `model` for cfg.max_steps optimizer steps, resuming from workdir/checkpoints.

    global_batch(step) must be a pure function of the step (that is what makes resume exact).
    save_model(module, dir) writes the consolidated Hugging Face directory (called on rank 0 with
    full parameters). Returns where the consolidated output lies.
    """
    ensure_distributed_env()
    import deepspeed

    workdir = Path(workdir)
    out_dir = workdir / "output"
    metrics_path = workdir / "metrics.jsonl"
    if (out_dir / ".complete").exists():
        return LoopResult(str(out_dir), cfg.max_steps, None, str(metrics_path), already_done=True)

    rank, world = rank_world()
    if world != cfg.world_size:
        raise RuntimeError(f"launched with WORLD_SIZE={world} but the stage asks for {cfg.world_size}")
    # ranks on this machine share its cores (all of them on one node; nproc_per_node on each of several)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    torch.set_num_threads(cfg.num_threads or max(1, (os.cpu_count() or 1) // local))
    ckpt_dir = workdir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)

    trainable = trainable_param_groups(model, params)
    frozen = any(not p.requires_grad for p in model.parameters())  # LoRA: the base weights
    ds_config = deepspeed_config(cfg)
    if getattr(cfg, "lora", None) is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        raise ValueError(f"{cfg.deepspeed}: lora is not supported with ZeRO-3; use ZeRO-0/1/2 (adapters are small)")
    optimizer = torch.optim.AdamW(
        trainable, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
        fused=cfg.optim == "adamw_torch_fused",
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    low_precision = ds_config.get("bf16", {}).get("enabled", False)
    held = hold_fp32_values(model) if low_precision else []
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    seed_fp32_masters(engine, held)  # bf16: the masters are the fp32 weights, not their bf16 casts
    del held
    trim_engine(engine, world)
    if frozen:
        engine.module_state_dict = functools.partial(trainable_state_dict, engine)
    reseed = _has_dropout(model)
    if cfg.torch_compile:  # module.compile in place: parameter names and checkpoints are unchanged
        engine.compile(compile_kwargs={"dynamic": True})

    start_step, resumed_from = 0, None
    if rank == 0:  # drop the uncommitted tags of a save that was killed midway
        prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
    if latest_checkpoint_step(ckpt_dir) is not None:
        # a checkpoint of a model with frozen weights holds only the trainable ones
        path, client = engine.load_checkpoint(str(ckpt_dir), load_module_strict=not frozen)
        if path is None:
            raise ResumeError(f"{ckpt_dir}: 'latest' names a checkpoint that could not be loaded")
        start_step = int(client["step"])
        expected = start_step * cfg.batch_size
        if client.get("samples_seen") != expected or client.get("batch_size") != cfg.batch_size:
            raise ResumeError(
                f"{path}: data position {client.get('samples_seen')} does not continue step "
                f"{start_step} × batch {cfg.batch_size} = {expected}"
            )
        if engine.global_steps != start_step:
            raise ResumeError(f"{path}: engine step {engine.global_steps} != checkpoint step {start_step}")
        resumed_from = start_step
    if rank == 0:
        truncate_jsonl_after(metrics_path, start_step)

    ga, mbs = cfg.grad_accum, cfg.micro_batch_size
    last: dict[str, float] = {}
    engine.train()
    t_last = time.perf_counter()
    for step in range(start_step, cfg.max_steps):
        batch = global_batch(step)
        if len(batch) != cfg.batch_size:
            raise ValueError(f"global_batch({step}) gave {len(batch)} items, expected {cfg.batch_size}")
        sums: dict[str, float] = {}
        if reseed:  # dropout masks a pure function of (seed, step): a resumed run draws the same ones
            torch.manual_seed(_step_seed(cfg.seed, step))
        for m in range(ga):
            chunk_idx = m * world + rank
            chunk = batch[chunk_idx * mbs : (chunk_idx + 1) * mbs]
            ctx = StepContext(step, m, rank, world, ga, batch, float(ga * world))
            loss, metrics = step_fn(engine, chunk, ctx)
            engine.backward(loss)
            engine.step()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v)
        if after_step is not None:
            after_step(engine, step)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            keys = sorted(sums)
            # on the engine's device: NCCL (the CUDA backend) all-reduces device tensors only
            vals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=engine.device)
            if world > 1:
                torch.distributed.all_reduce(vals)
            now = time.perf_counter()
            last = dict(zip(keys, vals.tolist()))
            last.update(step=done, lr=scheduler.get_last_lr()[0], step_seconds=(now - t_last))
            t_last = now
            if rank == 0:
                with open(metrics_path, "a") as fh:
                    fh.write(json.dumps(last) + "\n")
                if on_log is not None:
                    on_log(dict(last, max_steps=cfg.max_steps))
        fault_point("step-done", workdir.name, done, rank)
        if done % cfg.save_every == 0 or done == cfg.max_steps:
            engine.save_checkpoint(  # returns once every rank's files are written (it ends on a barrier)
                str(ckpt_dir), tag=checkpoint_tag(done), save_latest=False, exclude_frozen_parameters=frozen,
                client_state={"step": done, "samples_seen": done * cfg.batch_size, "batch_size": cfg.batch_size},
            )
            fault_point("checkpoint-uncommitted", workdir.name, done)
            if rank == 0:
                commit_checkpoint(ckpt_dir, checkpoint_tag(done))
            barrier(world)
            if rank == 0:  # a finished stage keeps its final checkpoint only (its output is the model)
                prune_checkpoints(ckpt_dir, 1 if done == cfg.max_steps else cfg.keep_checkpoints)

    consolidate(engine, save_model, out_dir, rank, world)
    return LoopResult(str(out_dir), cfg.max_steps, resumed_from, str(metrics_path), last)


def _has_dropout(model: torch.nn.Module) -> bool:
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in model.modules())


def _step_seed(seed: int, step: int) -> int:
    import numpy as np

    return int(np.random.SeedSequence([seed, step, 0xD50]).generate_state(1)[0])


def truncate_jsonl_after(path: Path, start_step: int) -> None:
    """Drop JSONL rows whose `step` is past the checkpoint we resume from: those steps are about to be
    redone (metrics here, rollout samples in the RL recipes)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(ln + "\n" for ln in keep))
    os.replace(tmp, path)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
