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
import random
import shutil
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from models.training.faults import fault_point
from models.recipes.train_config import TrainConfig, deepspeed_json



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


def free_port() -> int:
    """A free TCP port for the rendezvous store, outside the kernel's ephemeral range.

    A port the kernel hands out for `bind(0)` is in the same range as the local ports of outgoing
    connections (Prefect's and MLflow's HTTP clients make many), so one can take it between our check
    and the store's bind (seen as EADDRINUSE). Ports below the ephemeral range are not handed out.
    """
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below the range is taken: fall back to the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def ensure_distributed_env(ops_cache: str | os.PathLike | None = None) -> None:
    """Make a bare process look like rank 0 of 1 (DeepSpeed otherwise looks for mpi4py)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if ops_cache is not None:
        # DeepSpeed JIT-compiles its shm_comm op at init (~25-40 s); cache it per machine/state dir.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ops_cache))
    clear_stale_op_locks(os.environ.get("TORCH_EXTENSIONS_DIR"))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if os.environ.get("WORLD_SIZE") == "1" and not torch.distributed.is_initialized():
        # One process needs no TCP store: a port picked here may be taken by another process before
        # DeepSpeed binds it (EADDRINUSE seen with runs started together). DeepSpeed adopts this group.
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)


STALE_LOCK_SECONDS = 300  # compiling one op takes < 1 min here


def clear_stale_op_locks(ops_dir: str | None, max_age: float = STALE_LOCK_SECONDS) -> list[Path]:
    """Remove torch-extension build locks left by a process killed while compiling.

    torch's FileBaton waits forever on such a lock, so one SIGKILL during the first compile would
    hang every later run. A lock older than any real compile is stale.
    """
    if not ops_dir or not Path(ops_dir).is_dir():
        return []
    removed = []
    now = time.time()
    for lock in Path(ops_dir).glob("*/lock"):
        try:
            if now - lock.stat().st_mtime > max_age:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            pass
    return removed


def rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of this process (0, 1 outside a launcher)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


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


# ----------------------------------------------------------------------------- checkpoints


def _tag(step: int) -> str:
    return f"step{step:07d}"


# A checkpoint is committed when `latest` names its tag. DeepSpeed writes its own `latest` with a plain
# open('w') (a kill between the truncate and the write leaves it empty: the next run starts over from
# step 0), so the loop saves with save_latest=False and moves `latest` into place itself, atomically,
# once every rank's files of the tag are on disk. A tag directory newer than `latest` is a save that
# was killed midway: never loaded, and removed before training goes on.


def _commit_checkpoint(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f"latest.tmp-{os.getpid()}"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / "latest")


def latest_checkpoint_step(ckpt_dir: Path) -> int | None:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    return int(tag.removeprefix("step")) if tag.startswith("step") else None


def _prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
    current = (ckpt_dir / "latest").read_text().strip() if (ckpt_dir / "latest").exists() else None
    tags = sorted(p for p in ckpt_dir.glob("step*") if p.is_dir())
    # Keep the newest `keep` tags; a partially written newer tag (a save killed midway) is also
    # dropped because `latest` never pointed at it.
    keep_tags = {p.name for p in tags if current and p.name <= current}
    keep_tags = set(sorted(keep_tags)[-keep:])
    for p in tags:
        if p.name not in keep_tags:
            shutil.rmtree(p, ignore_errors=True)
    for p in ckpt_dir.glob("latest.tmp-*"):  # a commit killed before its rename
        p.unlink(missing_ok=True)


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
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
    )
    trim_engine(engine, world)
    if frozen:
        engine.module_state_dict = functools.partial(_trainable_state_dict, engine)
    reseed = _has_dropout(model)
    if cfg.torch_compile:  # module.compile in place: parameter names and checkpoints are unchanged
        engine.compile(compile_kwargs={"dynamic": True})

    start_step, resumed_from = 0, None
    if rank == 0:  # drop the uncommitted tags of a save that was killed midway
        _prune_checkpoints(ckpt_dir, cfg.keep_checkpoints)
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
                str(ckpt_dir), tag=_tag(done), save_latest=False, exclude_frozen_parameters=frozen,
                client_state={"step": done, "samples_seen": done * cfg.batch_size, "batch_size": cfg.batch_size},
            )
            fault_point("checkpoint-uncommitted", workdir.name, done)
            if rank == 0:
                _commit_checkpoint(ckpt_dir, _tag(done))
            _barrier(world)
            if rank == 0:  # a finished stage keeps its final checkpoint only (its output is the model)
                _prune_checkpoints(ckpt_dir, 1 if done == cfg.max_steps else cfg.keep_checkpoints)

    _consolidate(engine, save_model, out_dir, rank, world)
    return LoopResult(str(out_dir), cfg.max_steps, resumed_from, str(metrics_path), last)


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


def _trainable_state_dict(engine, destination=None, prefix="", keep_vars=False, exclude_frozen_parameters=False):
    """DeepSpeedEngine.module_state_dict for a model with frozen weights: the module's state dict
    without any frozen parameter. DeepSpeed's own `exclude_frozen_parameters` looks the frozen ones up
    in `named_parameters()`, which lists a tied weight once, so a frozen tied LM head (`lm_head.weight`,
    the embedding matrix) would stay in every checkpoint; here every name of a frozen tensor goes."""
    sd = engine.module.state_dict(destination=destination, prefix=prefix, keep_vars=keep_vars)
    for n, p in engine.module.named_parameters(remove_duplicate=False):
        if not p.requires_grad:
            sd.pop(prefix + n, None)
    return sd


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


def _consolidate(engine, save_model, out_dir: Path, rank: int, world: int) -> None:
    """Write full weights to out_dir atomically: a temp dir, then a rename, then a marker."""
    import deepspeed

    module = engine.module
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    if engine.zero_optimization_stage() == 3:
        params = list(module.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            if rank == 0:
                save_model(module, tmp)
    elif rank == 0:
        save_model(module, tmp)
    if rank == 0:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        (out_dir / ".complete").write_text("ok\n")
    _barrier(world)


def read_metrics(path: str | os.PathLike) -> list[dict]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(ln) for ln in p.read_text().splitlines() if ln.strip()]
