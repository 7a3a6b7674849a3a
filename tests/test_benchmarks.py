"""The benchmark harness (benchmarks/): the cheap scripts run in --quick mode and write a results.json
of the documented schema. No timing is asserted: these are smoke tests of the harness, not results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(module: str, out: Path, *args: str) -> None:
    from benchmarks.common import child_env

    p = subprocess.run([sys.executable, "-m", module, "--quick", "--out", str(out), *args], cwd=REPO,
                       env=child_env(2), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, f"{module} failed:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}"


def _check_entry(entry: dict, key: str) -> None:
    from benchmarks.headlines import TARGETS

    assert set(entry) >= {"value", "target", "meets_target", "raw", "script", "quick", "threads", "measured_at", "machine"}
    assert entry["quick"] is True and entry["threads"] == 2
    assert entry["target"] == f"{TARGETS[key][0]} {TARGETS[key][1]}"
    assert entry["value"] is None or (isinstance(entry["value"], float) and entry["value"] > 0)
    assert entry["meets_target"] in (True, False, None)
    assert isinstance(entry["raw"].get("summary"), str) and entry["raw"]["summary"]
    assert entry["machine"]["cores"] >= 1 and entry["machine"]["versions"]["torch"]


def test_rollout_and_sft_quick_write_the_results_schema(tmp_path):
    _run("benchmarks.bench_rollout", tmp_path)
    _run("benchmarks.bench_sft", tmp_path, "--no-trl")
    data = json.loads((tmp_path / "results.json").read_text())
    res = data["results"]
    for key in ("rollout_speedup_vs_generate", "sft_mfu", "sft_tokens_speedup_vs_trl"):
        _check_entry(res[key], key)
    r = res["rollout_speedup_vs_generate"]["raw"]
    assert r["posttrain_new_tokens_per_s"] > 0 and r["generate_new_tokens_per_s"] > 0
    assert res["rollout_speedup_vs_generate"]["value"] == pytest.approx(
        r["posttrain_new_tokens_per_s"] / r["generate_new_tokens_per_s"], rel=1e-3)
    m = res["sft_mfu"]["raw"]
    assert m["matmul_peak_gflops"] > 0 and m["model"]["params"] > 0 and 0 < res["sft_mfu"]["value"]
    # --no-trl: the TRL ratio is recorded as not measured, with the reason, and the raw figure beside it
    s = res["sft_tokens_speedup_vs_trl"]
    assert s["value"] is None and s["note"] and s["raw"]["posttrain_tokens_per_s"] > 0
    md = (tmp_path / "results.md").read_text()
    for key in ("rollout_speedup_vs_generate", "sft_mfu", "grpo_step_speedup_vs_trl"):
        assert f"`{key}`" in md


def test_results_markdown_lists_every_headline_and_the_run(tmp_path):
    from benchmarks import headlines

    data = {"run": {"command": "make bench", "date": "2026-01-01T00:00:00Z", "quick": False,
                    "machine": headlines.machine_info(2)}, "results": {}}
    headlines.write_results(data, tmp_path)
    headlines.record("cached_rerun_fraction", 0.02, {"summary": "first 100 s, rerun 2 s"}, script="x.py", quick=False,
                     threads=2, out_dir=tmp_path)
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["run"]["command"] == "make bench"
    assert data["results"]["cached_rerun_fraction"]["meets_target"] is True
    md = (tmp_path / "results.md").read_text()
    assert "make bench" in md and "2026-01-01" in md
    for key in headlines.TARGETS:
        assert f"`{key}`" in md
    assert "| `cached_rerun_fraction` | 0.02 | <= 0.03 | yes |" in md


@pytest.mark.slow
def test_smollm2_scripts_quick_write_the_suffixed_keys(tmp_path, smollm2_dir, monkeypatch):
    """`--model smollm2` (issue #16): the real model's comparisons run on chat prompts and record
    their own keys (`*_smollm2`) beside the tiny model's, with targets; a cheap pair of them here."""
    monkeypatch.setenv("POSTTRAIN_BENCH_SMOLLM2_DIR", str(smollm2_dir))
    _run("benchmarks.bench_rollout", tmp_path, "--model", "smollm2", "--reps", "1")
    _run("benchmarks.bench_dpo", tmp_path, "--model", "smollm2", "--no-trl", "--reps", "1", "--warmup", "1")
    res = json.loads((tmp_path / "results.json").read_text())["results"]
    assert set(res) == {"rollout_speedup_vs_generate_smollm2", "dpo_tokens_speedup_vs_trl_smollm2"}
    for key, entry in res.items():
        _check_entry(entry, key)
        assert entry["raw"]["base"] == str(smollm2_dir)
    r = res["rollout_speedup_vs_generate_smollm2"]["raw"]
    assert r["batch"] == {"prompts": 8, "samples_per_prompt": 4, "max_new_tokens": 16}
    assert r["posttrain_new_tokens_per_s"] > 0 and r["generate_new_tokens_per_s"] > 0
    d = res["dpo_tokens_speedup_vs_trl_smollm2"]
    assert d["value"] is None and d["raw"]["pairs_per_step"] == 8 and d["raw"]["posttrain_tokens_per_s"] > 0
