"""Every shipped recipe runs end to end at its smoke size (r1 is covered by tests/test_flow.py)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.parametrize("recipe,stages", [
    ("r1-zero", ["fetch", "grpo"]),
    ("tulu3", ["fetch", "sft", "dpo", "grpo"]),
    ("rlhf", ["fetch", "sft", "reward_model", "ppo"]),
])
def test_recipe_smoke_runs_end_to_end(recipe, stages, tmp_path):
    summary = tmp_path / "summary.json"
    p = subprocess.run([sys.executable, "-m", "flows.cli", "run", recipe, "--smoke", "--state-dir", str(tmp_path / "state"),
                        "--summary-json", str(summary)], cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"),
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-5000:]
    s = json.loads(summary.read_text())
    assert [st["stage"] for st in s["stages"]] == stages
    for st in s["stages"]:
        if st["stage"] != "reward_model":  # a reward model is not a policy: it is not evaluated
            assert "pass@1" in st["metrics"], st
    assert s["registered_model"] == f"models:/posttrain-{recipe}-smoke/1"
