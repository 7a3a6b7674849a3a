"""Cache keys and code versions.

A stage's cache key is hash(stage name, resolved stage config, input digests, stage code version).
Input *digests* go in, never paths or run ids: the same bytes reached from another directory or run
are the same input. Bookkeeping fields that cannot change a result are left out.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import json
import subprocess
from pathlib import Path

from data_contracts.artifacts import ArtifactRef

REPO_ROOT = Path(__file__).resolve().parent.parent

# Fields that never change what a stage computes (only how often it logs or keeps files, or how its
# ranks are spread over machines: world_size, which is in the key, fixes what each rank computes, so
# 2 nodes × 1 rank and 1 node × 2 ranks share a key and a work dir, and one can resume the other).
BOOKKEEPING_FIELDS = frozenset({
    "log_every", "save_every", "keep_checkpoints", "nnodes", "nproc_per_node", "rdzv_endpoint", "rdzv_timeout_s",
})

# Fields added after stages were cached, left out of the key at their default: there they compute
# exactly what configs written before them did (the built-in corpus and pretraining of earlier
# versions, document for document), so adding them keeps every finished stage cached.
ADDED_AT_DEFAULT = {"worked_after_question": False, "check_fraction": 0.0, "guess_accuracy": 0.5, "packing": "blocks"}


def _kept(k, v) -> bool:
    if k in BOOKKEEPING_FIELDS:
        return False
    return not (k in ADDED_AT_DEFAULT and v == ADDED_AT_DEFAULT[k])


def _strip(obj):
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in sorted(obj.items()) if _kept(k, v)}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


# Our own packages: a stage's code version covers the modules of these that it imports.
OWN_PACKAGES = ("models", "data_contracts", "tasks")
# Modules that only record or display (MLflow, progress): they cannot change what a stage computes.
# Config modules are schemas: every value they resolve to is in the key already (the resolved
# stage config), so editing one (a new stage's section) must not invalidate finished stages.
BOOKKEEPING_MODULES = frozenset({
    "tasks.tracking", "tasks.progress", "models.config", "models.recipes.train_config", "models.recipes.rl_config",
    "models.recipes.preference_config", "models.recipes.ppo_config", "models.recipes.sample_filter_config", "models.stages",
})


def _module_file(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in OWN_PACKAGES:
        return None
    base = REPO_ROOT.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def _imports(path: Path) -> set[str]:
    """Every module name a file imports, at any depth (lazy imports inside functions included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # `from pkg import module`
    return names


def stage_source_files(entry_modules: tuple[str, ...]) -> list[Path]:
    """The transitive closure of our own modules imported from the entry modules."""
    seen: dict[Path, None] = {}
    todo = [m for m in entry_modules]
    while todo:
        name = todo.pop()
        f = None if name in BOOKKEEPING_MODULES else _module_file(name)
        if f is None or f in seen:
            continue
        seen[f] = None
        todo.extend(_imports(f))
        if "." in name:  # importing pkg.mod runs pkg/__init__.py too
            todo.append(name.rsplit(".", 1)[0])
    return sorted(seen)


@functools.lru_cache(maxsize=None)
def stage_code_version(*entry_modules: str) -> str:
    """sha256 over the sources a stage runs: its task module and everything of ours it imports.

    Editing an unrelated module (a new RL recipe, the CLI, the README) keeps finished stages cached;
    editing anything the stage runs invalidates it.
    """
    h = hashlib.sha256()
    for f in stage_source_files(tuple(entry_modules)):
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
