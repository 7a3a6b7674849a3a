"""The datasets a node reads from its own settings (not from an upstream node), resolved and
validated before any stage runs. Each is named by a stage kind's `data` entry in models/stages.py:
`(settings, task, datasets dir) -> {input name: ArtifactRef}`; the input names are what the task
and the cache key see.
"""

from __future__ import annotations

from pathlib import Path

from data_contracts.artifacts import ArtifactRef
from models.config import TaskConfig
from tasks.data import resolve_preferences, resolve_problems, resolve_sft_dataset


def fetch_source(sc, task: TaskConfig, datasets: Path) -> dict[str, ArtifactRef]:
    """A .gguf file's digest (the file no stage produced); {} for any other uri."""
    from tasks.fetch import fetch_inputs

    return fetch_inputs(sc.uri)


def sft_dataset(sc, task: TaskConfig, datasets: Path) -> dict[str, ArtifactRef]:
    return {"dataset": resolve_sft_dataset(sc.dataset, task, datasets, sc.split)}


def prompts(sc, task: TaskConfig, datasets: Path) -> dict[str, ArtifactRef]:
    return {"prompts": resolve_problems(sc.prompts, task, datasets, split="train")}


def preferences(sc, task: TaskConfig, datasets: Path) -> dict[str, ArtifactRef]:
    """On-policy pairs come from prompts (the stage samples them); otherwise a preference file."""
    if sc.dataset == "onpolicy":
        return prompts(sc, task, datasets)
    return {"dataset": resolve_preferences(sc.dataset)}
