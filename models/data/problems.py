"""Problems with reference answers as the stages read them (RL prompts, rejection sampling,
evaluation): the file validated against the problems contract (data_contracts/problems.py), which
names the file, row and field of a bad row."""

from __future__ import annotations

import os


def load_problems(path: str | os.PathLike) -> list[dict]:
    """Validated problems as [{"id", "prompt", "answer"}] (the data contract names bad rows)."""
    from data_contracts.io import read_table
    from data_contracts.problems import validate_problems

    df = validate_problems(read_table(path), str(path))
    if df.empty:
        raise ValueError(f"{path}: no problems")
    return [{"id": str(r["id"]), "prompt": r["prompt"], "answer": str(r["answer"])} for r in df.to_dict("records")]
