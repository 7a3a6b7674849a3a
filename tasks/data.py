"""Resolve the datasets a recipe names into validated files with digests — before any training.

- `builtin`: the built-in task's splits, materialised once per task config under the state dir
  (deterministic content, written atomically, so the digest is stable across machines);
- a local `.jsonl` / `.json` / `.parquet` file;
- `hf://datasets/org/name@revision`: a snapshot through huggingface_hub, honouring its offline cache
  (`HF_HUB_OFFLINE=1`, `HF_HUB_CACHE`); the file is `<split>.jsonl|.parquet` or `data/<split>-*.parquet`.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_contracts.artifacts import ArtifactRef, digest_path
from data_contracts.io import read_table, write_jsonl_atomic
from data_contracts.preferences import validate_preferences
from data_contracts.problems import validate_problems
from data_contracts.sft import load_sft_dataset
from models.data import builtin_task
from models.config import TaskConfig


def builtin_dir(task: TaskConfig, datasets_root: Path) -> Path:
    blob = json.dumps(dict(task.model_dump(), version=builtin_task.TASK_VERSION), sort_keys=True)
    d = datasets_root / f"builtin-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"
    if not (d / "test_problems.jsonl").exists():
        train, test = builtin_task.make_problems(task.seed, task.n_train, task.n_test, task.min_operands,
                                                 task.max_operands, task.prompt_style)
        d.mkdir(parents=True, exist_ok=True)
        demos = builtin_task.sft_demonstrations(train, task.seed, task.sft_max_operands, task.sft_long_fraction)
        write_jsonl_atomic([{"id": p.id, "prompt": p.prompt, "completion": p.solution} for p in demos], d / "sft_train.jsonl")
        write_jsonl_atomic([{"id": p.id, "prompt": p.prompt, "answer": p.answer, "solution": p.solution} for p in train],
                           d / "train_problems.jsonl")
        # written last: its presence means the directory is complete
        write_jsonl_atomic([{"id": p.id, "prompt": p.prompt, "answer": p.answer, "solution": p.solution} for p in test],
                           d / "test_problems.jsonl")
    return d


def _hf_dataset_file(uri: str, split: str) -> Path:
    from huggingface_hub import snapshot_download

    spec = uri.removeprefix("hf://datasets/")
    repo, _, revision = spec.partition("@")
    root = Path(snapshot_download(repo_id=repo, repo_type="dataset", revision=revision or None))
    for pattern in (f"{split}.jsonl", f"{split}.parquet", f"{split}.json", f"data/{split}.jsonl",
                    f"data/{split}.parquet", f"data/{split}-*.parquet"):
        hits = sorted(root.glob(pattern))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"{uri}: no file for split '{split}' in {root} (looked for {split}.jsonl/.parquet, data/{split}-*.parquet)")


class MissingData(FileNotFoundError):
    """A dataset setting names a file that is not there; `at(node)` names the node's setting."""

    def __init__(self, key: str, path: Path):
        self.key, self.path = key, path
        super().__init__(f"{key}: {path}: no such file")

    def at(self, node: str) -> MissingData:
        return MissingData(f"{node}.{self.key}", self.path)


def resolve_sft_dataset(name: str, task: TaskConfig, datasets_root: Path, split: str = "train") -> ArtifactRef:
    """A validated SFT dataset file (raises ContractError naming file, row and field)."""
    if name == "builtin":
        path = builtin_dir(task, datasets_root) / "sft_train.jsonl"
    elif name.startswith("hf://datasets/"):
        path = _hf_dataset_file(name, split)
    else:
        path = Path(name).expanduser().resolve()
        if not path.exists():
            raise MissingData("dataset", path)
    load_sft_dataset(path)  # validate now, before any stage trains
    return ArtifactRef(kind="dataset", path=str(path), digest=digest_path(path))


def resolve_problems(name: str, task: TaskConfig, datasets_root: Path, split: str = "test",
                     key: str = "prompts") -> ArtifactRef:
    """Problems (id, prompt, answer), validated; `key` names the setting in errors."""
    if name == "builtin":
        path = builtin_dir(task, datasets_root) / f"{split}_problems.jsonl"
    elif name.startswith("hf://datasets/"):
        path = _hf_dataset_file(name, split)
    else:
        path = Path(name).expanduser().resolve()
        if not path.exists():
            raise MissingData(key, path)
    validate_problems(read_table(path), str(path))
    return ArtifactRef(kind="dataset", path=str(path), digest=digest_path(path))


def resolve_preferences(name: str) -> ArtifactRef:
    """A validated preference file in TRL's format (prompt, chosen, rejected)."""
    path = Path(name).expanduser().resolve()
    if not path.exists():
        raise MissingData("dataset", path)
    validate_preferences(read_table(path), str(path))
    return ArtifactRef(kind="dataset", path=str(path), digest=digest_path(path))
