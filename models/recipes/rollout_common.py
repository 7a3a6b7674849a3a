"""What the on-policy recipes (GRPO, PPO) share: problems, rollout seeds, the policy to sample
from under ZeRO-3, the models they load, one rollout batch reused for several optimizer steps (GRPO's
num_iterations, PPO's ppo_epochs), and the rollouts.jsonl sample that a resume keeps exact.

`models.recipes.grpo` re-exports the helpers it has always exported (`load_problems`,
`rollout_seed`, `sampling_policy`, `truncate_rollout_log`).
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from models.data.problems import load_problems
from models.modeling.device import training_device
from models.training.checkpoints import latest_checkpoint_step
from models.training.deepspeed_setup import deepspeed_config
from models.training.engine import truncate_jsonl_after

# ----------------------------------------------------------------------------- data


def spec_problems(spec: dict, cfg, recipe: str) -> list[dict]:
    """The problems of `spec['prompts_path']`, else of a `cfg.prompts` file ('builtin' is the task
    layer's to resolve). `recipe` names the caller in the error."""
    prompts_path = spec.get("prompts_path") or (cfg.prompts if cfg.prompts != "builtin" else None)
    if prompts_path is None:
        raise ValueError(f"{recipe} needs spec['prompts_path'] (the task layer resolves 'builtin')")
    return load_problems(prompts_path)


def rollout_seed(seed: int, step: int) -> int:
    """Sampling seed of a step: a pure function of (config seed, step), decorrelated across steps."""
    return int(np.random.SeedSequence([seed, step]).generate_state(1)[0])


# ----------------------------------------------------------------------------- models


def pad_token_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_causal_lm(path: str, frozen: bool = False):
    """An HF causal LM in fp32; `frozen`: in eval mode without gradients (a reference policy)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if frozen:  # a frozen model never meets DeepSpeed, which moves the trained one: move it here
        model.eval().requires_grad_(False).to(training_device())
    return model


def reference_policy(model: torch.nn.Module, path: str, cfg):
    """The frozen start policy of a KL penalty: with LoRA (`cfg.lora`) the trained model itself with
    its adapters switched off (no second copy of the weights), else the checkpoint at `path` loaded
    again, frozen."""
    from models.modeling.lora import AdaptersOff

    return AdaptersOff(model) if cfg.lora is not None else load_causal_lm(path, frozen=True)


def zero3_shadow(model: torch.nn.Module, cfg) -> torch.nn.Module | None:
    """A frozen plain copy of `model` to sample from when cfg trains under ZeRO-3, else None."""
    zero_stage = deepspeed_config(cfg).get("zero_optimization", {}).get("stage", 0)
    return copy.deepcopy(model).requires_grad_(False) if zero_stage == 3 else None


@contextlib.contextmanager
def sampling_policy(model: torch.nn.Module, shadow: torch.nn.Module | None):
    """The current policy with full parameters, for generation.

    ZeRO 0-2 keep full parameters on every rank: sample from `model` itself. Under ZeRO-3 the
    parameters are partitioned; gather them (every rank takes part) and copy them into `shadow`, a
    plain copy of the architecture, so that generation runs without ZeRO's per-module fetch hooks
    (which would all-gather on every decoding step). Restores train mode afterwards.
    """
    if shadow is None or not hasattr(next(model.parameters()), "ds_id"):
        try:
            yield model
        finally:
            model.train()
        return
    import deepspeed

    params = list(model.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None), torch.no_grad():
        for src, dst in zip(params, shadow.parameters()):
            dst.copy_(src.data.view_as(dst))
    yield shadow


# ----------------------------------------------------------------------------- batch reuse


def reused_batches(
    build: Callable[[int, int], list[dict]], every: int, knob: str
) -> Callable[[int], list[dict]]:
    """`global_batch(step)` that builds a rollout batch on steps that are multiples of `every`
    (`build(step, step // every)`: the step that samples it and the batch's index) and hands the same
    batch to the next `every - 1` steps (GRPO's μ = num_iterations, PPO's ppo_epochs). Only the current
    batch is kept; a step inside a batch this process never built (a resume off a batch boundary)
    is an error naming the config field `knob`."""
    held: dict[str, object] = {"step": None, "items": None}

    def global_batch(step: int) -> list[dict]:
        first = step - step % every
        if held["step"] == first:
            return held["items"]
        if first != step:
            raise RuntimeError(
                f"step {step}: the rollout batch of step {first} is not in memory (this process never "
                f"sampled it; a resume must start at a multiple of {knob} = {every})"
            )
        held.update(step=None, items=None)
        items = build(step, step // every)
        held.update(step=step, items=items)
        return items

    return global_batch


def logs_batch(step: int, every: int, save_every: int, log_rollouts: int) -> bool:
    """Whether the rollout batch built at `step` goes to the rollout log: the first batch, and every
    batch whose last step (`step + every`, 1-based) saves a checkpoint."""
    return log_rollouts > 0 and (step == 0 or (step + every) % save_every == 0)


# ----------------------------------------------------------------------------- rollout log


truncate_rollout_log = truncate_jsonl_after  # the rollout log is step-keyed JSONL like metrics.jsonl


def rollout_logger(
    workdir: Path, should_log: Callable[[int], bool], rows: Callable[[int, list[dict]], list[dict]]
) -> tuple[Path, Callable[[int, list[dict]], None]]:
    """(rollouts_path, on_batch): rank 0 appends `rows(step, items)` to workdir/rollouts.jsonl on the
    steps `should_log` picks. An unfinished run's log is first cut back to its latest checkpoint, so
    that a resume rewrites exactly the rows an uninterrupted run would have written."""
    rank = int(os.environ.get("RANK", 0))
    rollouts_path = workdir / "rollouts.jsonl"
    if rank == 0 and not (workdir / "output" / ".complete").exists():
        truncate_rollout_log(rollouts_path, latest_checkpoint_step(workdir / "checkpoints") or 0)

    def log_batch(step: int, items: list[dict]) -> None:
        if rank == 0 and should_log(step):
            workdir.mkdir(parents=True, exist_ok=True)
            with open(rollouts_path, "a") as fh:
                for row in rows(step, items):
                    fh.write(json.dumps(row) + "\n")

    return rollouts_path, log_batch


def rollout_result(res, rollouts_path: Path, problems: list[dict]) -> dict:
    """A recipe's return value: run_loop's result plus the rollout sample and problem count."""
    return {
        "output_dir": res.output_dir, "final_step": res.final_step,
        "resumed_from_step": res.resumed_from_step, "already_done": res.already_done,
        "metrics_path": res.metrics_path, "last_metrics": res.last_metrics,
        "rollouts_path": str(rollouts_path), "num_problems": len(problems),
    }


__all__ = [
    "load_problems", "spec_problems", "rollout_seed", "pad_token_id", "load_causal_lm", "reference_policy",
    "zero3_shadow",
    "sampling_policy", "truncate_rollout_log", "rollout_logger", "rollout_result", "reused_batches", "logs_batch",
]
