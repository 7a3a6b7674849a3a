"""Cache keys and code versions.

A stage's cache key is hash(stage name, resolved stage config, input digests, stage code version).
Input *digests* go in, never paths or run ids: the same bytes reached from another directory or run
are the same input. Bookkeeping fields that cannot change a result are left out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import subprocess
from pathlib import Path

from data_contracts.artifacts import ArtifactRef

REPO_ROOT = Path(__file__).resolve().parent.parent

# Fields that never change what a stage computes (only how often it logs or keeps files).
BOOKKEEPING_FIELDS = frozenset({"log_every", "save_every", "keep_checkpoints"})

# Source that determines what a stage computes: the ML core, the contracts, and the stage's task.
CODE_DIRS = ("models", "data_contracts")


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in sorted(obj.items()) if k not in BOOKKEEPING_FIELDS}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


@functools.lru_cache(maxsize=None)
def stage_code_version(task_module_file: str) -> str:
    """sha256 over the .py sources of models/, data_contracts/ and the stage's task module."""
    h = hashlib.sha256()
    files = sorted(p for d in CODE_DIRS for p in (REPO_ROOT / d).rglob("*.py"))
    files.append(Path(task_module_file))
    for f in files:
        h.update(f.relative_to(REPO_ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def stage_cache_key(stage: str, config: dict, inputs: dict[str, ArtifactRef], code_version: str) -> str:
    payload = {
        "stage": stage,
        "config": _strip(config),
        "inputs": {name: ref.digest for name, ref in sorted(inputs.items())},
        "code": code_version,
    }
    blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


@functools.lru_cache(maxsize=1)
def git_code_version() -> str:
    """The git commit of the checkout, with '-dirty' when tracked files differ; 'unknown' outside git."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        if not sha:
            return "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO_ROOT,
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
