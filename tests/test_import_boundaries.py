"""The layers import downwards only (docs: DESIGN.md "Layers", STYLE.md rules 1 and 6).

Every .py file is parsed with `ast`, never imported, so imports inside functions (lazy ones) count
too. A violation is reported as `path:line: import …`.

The rules the code follows:
- `models/` (the ML core) imports neither `prefect` nor `mlflow`, nor the layers above it (`tasks`, `flows`).
- `models/algorithms/` (the pure algorithms) imports no model code: neither transformers, DeepSpeed
  nor peft, nor `models.training`, `models.generation`, `models.modeling` or `models.data`.
- `data_contracts/` (schemas) imports nothing of `models`, `tasks` or `flows`.
- `tasks/tracking.py` is the only module of `models/`, `data_contracts/`, `tasks/` and `flows/` that
  imports `mlflow` (flows reach MLflow through tasks.tracking too). Tests may use mlflow directly to
  read what was recorded.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, top-level-qualified module name) of every absolute import in the file, at any depth."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.extend((node.lineno, a.name) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return sorted(out)


def violations(folder: str, forbidden: set[str], allowed_files: frozenset[str] = frozenset(), root: Path = ROOT) -> list[str]:
    """`path:line: import name` for each import under root/folder of a forbidden package or module
    (`models.training` forbids it and everything under it)."""
    found = []
    for path in sorted((root / folder).rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel in allowed_files:
            continue
        for line, name in imported_modules(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{rel}:{line}: import {name}")
    return found


@pytest.mark.parametrize(
    "folder, forbidden, allowed",
    [
        ("models", {"prefect", "mlflow", "tasks", "flows"}, frozenset()),
        # the pure algorithms (advantages, losses, KL, log-probs, metrics, filters, reasoning stats)
        # are functions of tensors and tables: no model, engine, sampler or data pipeline
        ("models/algorithms", {"transformers", "deepspeed", "peft", "models.training", "models.generation",
                               "models.modeling", "models.data"}, frozenset()),
        ("data_contracts", {"models", "tasks", "flows"}, frozenset()),
        ("tasks", {"mlflow"}, frozenset({"tasks/tracking.py"})),
        ("flows", {"mlflow"}, frozenset()),
        ("data_contracts", {"mlflow", "prefect"}, frozenset()),
    ],
)
def test_layer_imports_point_down(folder, forbidden, allowed):
    assert violations(folder, forbidden, allowed) == []


def test_the_checker_sees_lazy_and_from_imports(tmp_path):
    """The checker itself can fail: a lazy `import mlflow` inside a function, and a `from prefect
    import flow`, are both reported with their line."""
    pkg = tmp_path / "models"
    pkg.mkdir()
    (pkg / "bad.py").write_text("import os\n\ndef f():\n    import mlflow.tracking\n\nfrom prefect import flow\n")
    assert violations("models", {"prefect", "mlflow"}, root=tmp_path) == [
        "models/bad.py:4: import mlflow.tracking", "models/bad.py:6: import prefect",
    ]
