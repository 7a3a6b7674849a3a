"""How a training stage writes what it trains: DeepSpeed checkpoints every N steps (committed
atomically, found again on resume, pruned), and its output, a Hugging Face directory that every later
stage and every user loads as a plain model (weights, tokenizer, the base's generation and posttrain
configs), consolidated from the engine and published by a rename."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from models.training.distributed import barrier
from models.modeling.lora import ADAPTER_DIR, has_adapters, merged_state_dict, save_adapter


def save_hf_dir(tokenizer, base_dir: str | None):
    """A save_model callback: weights + tokenizer + the base's generation/prompt configs. A model
    with LoRA adapters is written merged (a plain model with the base's parameter names), and its
    adapter alone goes to `out/adapter/` (models/modeling/lora.py)."""

    def save(module, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        module.save_pretrained(out, state_dict=merged_state_dict(module), safe_serialization=True)
        if has_adapters(module):
            save_adapter(module, out / ADAPTER_DIR, base_dir)
        tokenizer.save_pretrained(out)
        if base_dir:
            for name in ("generation_config.json", "posttrain.json"):
                src = Path(base_dir) / name
                if src.exists():
                    shutil.copy2(src, out / name)

    return save


# ----------------------------------------------------------------------------- DeepSpeed checkpoints


def checkpoint_tag(step: int) -> str:
    return f"step{step:07d}"

# A checkpoint is committed when `latest` names its tag. DeepSpeed writes its own `latest` with a plain
# open('w') (a kill between the truncate and the write leaves it empty: the next run starts over from
# step 0), so the loop saves with save_latest=False and moves `latest` into place itself, atomically,
# once every rank's files of the tag are on disk. A tag directory newer than `latest` is a save that
# was killed midway: never loaded, and removed before training goes on.


def commit_checkpoint(ckpt_dir: Path, tag: str) -> None:
    tmp = ckpt_dir / f"latest.tmp-{os.getpid()}"
    tmp.write_text(tag)
    os.replace(tmp, ckpt_dir / "latest")

def latest_checkpoint_step(ckpt_dir: Path) -> int | None:
    latest = ckpt_dir / "latest"
    if not latest.exists():
        return None
    tag = latest.read_text().strip()
    return int(tag.removeprefix("step")) if tag.startswith("step") else None

def prune_checkpoints(ckpt_dir: Path, keep: int) -> None:
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

def consolidate(engine, save_model, out_dir: Path, rank: int, world: int) -> None:
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
    barrier(world)
