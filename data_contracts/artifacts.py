"""Artifact refs: what crosses a stage boundary instead of weights or data.

A ref names a file or directory on disk, the sha256 digest of its content, and the MLflow run that
produced it. Prefect persists refs (small JSON), never the artifacts themselves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

_CHUNK = 1 << 20


def digest_path(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, or of a directory's sorted (relative path, bytes) pairs.

    Hidden files and directories (names starting with '.') are skipped, so a tool's lock or cache
    file inside a model directory does not change its identity.
    """
    p = Path(path)
    h = hashlib.sha256()
    if p.is_file():
        _update_file(h, p)
        return "sha256:" + h.hexdigest()
    if not p.is_dir():
        raise FileNotFoundError(f"cannot digest {p}: no such file or directory")
    for f in sorted(_walk(p)):
        rel = f.relative_to(p).as_posix()
        h.update(rel.encode() + b"\0")
        _update_file(h, f)
        h.update(b"\0")
    return "sha256:" + h.hexdigest()


def _walk(root: Path):
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith("."):
                yield Path(dirpath) / name


def _update_file(h, f: Path) -> None:
    with open(f, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)


# Kinds of input that lineage checks by digest on disk and MLflow records as a logged input: datasets,
# and "source" files that no stage run produced (a .gguf checkpoint that fetch converts).
EXTERNAL_KINDS = ("dataset", "source")


class ArtifactRef(BaseModel):
    """A pointer to a stage output: path + content digest + producing MLflow run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="what the artifact is: 'model', 'dataset', 'eval', 'source'")
    path: str = Field(description="absolute path on the shared filesystem")
    digest: str = Field(description="sha256 digest of the content, see digest_path()")
    run_id: str | None = Field(default=None, description="MLflow run that produced it, if tracked")
    stage: str | None = Field(default=None, description="recipe stage that produced it")

    def verify(self) -> bool:
        """True when the content on disk still has the recorded digest."""
        try:
            return digest_path(self.path) == self.digest
        except FileNotFoundError:
            return False
