"""The headline numbers of issue #7 and the files that hold them.

Every benchmark script merges its headline key(s) into `benchmarks/results.json` (or `--out`) with
`record`: the value, its target and whether it is met, the raw figures, when, on what machine and
with which command; `results.md` (the table the README shows) is re-rendered from the JSON each time.
`benchmarks/run.py` (`make bench`) starts a fresh file and stamps the run (`machine_info`, `now_utc`).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR, REPO, default_threads

# The headline keys and their targets (issue #7). `record` checks `value` against them.
TARGETS: dict[str, tuple[str, float]] = {
    "grpo_step_speedup_vs_trl": (">=", 2.0),
    "sft_tokens_speedup_vs_trl": (">=", 1.7),
    "dpo_tokens_speedup_vs_trl": (">=", 1.8),
    "rollout_speedup_vs_generate": (">=", 2.0),
    "sft_mfu": (">=", 0.60),
    "cached_rerun_fraction": ("<=", 0.03),
    "orchestration_overhead_fraction": ("<=", 0.05),
    "zero3_memory_fraction": ("<=", 0.55),
    # SmolLM2-135M-Instruct, fp32, chat prompts (issue #16; `--model smollm2`).
    "sft_tokens_speedup_vs_trl_smollm2": (">=", 1.2),
    "sft_lora_tokens_speedup_vs_trl_smollm2": (">=", 1.2),
    "sft_mfu_smollm2": (">=", 0.5),
    "grpo_step_speedup_vs_trl_smollm2": (">=", 1.5),
    "grpo_lora_step_speedup_vs_trl_smollm2": (">=", 1.5),
    "grpo_peak_rss_ratio_vs_trl_smollm2": ("<=", 1.0),
    "dpo_tokens_speedup_vs_trl_smollm2": (">=", 1.3),
    "rollout_speedup_vs_generate_smollm2": (">=", 1.3),
}
DESCRIPTIONS = {
    "grpo_step_speedup_vs_trl": "GRPO step (generate + score + update), TRL GRPOTrainer s/step ÷ posttrain s/step",
    "sft_tokens_speedup_vs_trl": "SFT tokens/s, posttrain ÷ TRL SFTTrainer",
    "dpo_tokens_speedup_vs_trl": "DPO policy tokens/s, posttrain ÷ TRL DPOTrainer",
    "rollout_speedup_vs_generate": "rollout new tokens/s at the GRPO batch, posttrain sampler ÷ model.generate",
    "sft_mfu": "SFT model FLOPs/s ÷ measured fp32 matmul peak",
    "cached_rerun_fraction": "cached rerun wall ÷ first run wall (whole CLI command)",
    "orchestration_overhead_fraction": "Prefect + MLflow time ÷ training-stage wall",
    "zero3_memory_fraction": "per-rank param + optimizer bytes, ZeRO-3 × 2 processes ÷ ZeRO-0",
    "sft_tokens_speedup_vs_trl_smollm2": "SmolLM2-135M SFT tokens/s, posttrain ÷ TRL SFTTrainer",
    "sft_lora_tokens_speedup_vs_trl_smollm2": "SmolLM2-135M LoRA SFT tokens/s, posttrain ÷ TRL SFTTrainer + peft",
    "sft_mfu_smollm2": "SmolLM2-135M SFT model FLOPs/s (eager) ÷ measured fp32 matmul peak",
    "grpo_step_speedup_vs_trl_smollm2": "SmolLM2-135M GRPO step, TRL GRPOTrainer s/step ÷ posttrain s/step",
    "grpo_lora_step_speedup_vs_trl_smollm2": "SmolLM2-135M LoRA GRPO step, TRL (peft) s/step ÷ posttrain s/step",
    "grpo_peak_rss_ratio_vs_trl_smollm2": "SmolLM2-135M GRPO worker peak RSS, posttrain ÷ TRL",
    "dpo_tokens_speedup_vs_trl_smollm2": "SmolLM2-135M DPO policy tokens/s, posttrain ÷ TRL DPOTrainer",
    "rollout_speedup_vs_generate_smollm2": "SmolLM2-135M rollout new tokens/s, posttrain sampler ÷ model.generate",
}


# ----------------------------------------------------------------------------- machine


def machine_info(threads: int | None = None) -> dict[str, Any]:
    import importlib.metadata as md

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gib = None
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal")).split()[1])
        mem_gib = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    versions = {}
    for pkg in ("torch", "transformers", "deepspeed", "trl", "accelerate", "prefect", "mlflow"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "cpu": cpu, "cores": default_threads(), "memory_gib": mem_gib, "threads": threads or default_threads(),
        "python": platform.python_version(), "platform": platform.platform(), "versions": versions,
        "load_average": [round(x, 2) for x in load] if load else None,
        "git_commit": _git("rev-parse", "--short", "HEAD"), "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
    }


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return None


def now_utc() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


# ----------------------------------------------------------------------------- results


def results_paths(out_dir: str | os.PathLike | None) -> tuple[Path, Path]:
    d = Path(out_dir) if out_dir else BENCH_DIR
    d.mkdir(parents=True, exist_ok=True)
    return d / "results.json", d / "results.md"


def load_results(out_dir=None) -> dict:
    path, _ = results_paths(out_dir)
    if path.exists():
        try:
            return json.loads(path.read_text())
        except json.JSONDecodeError:
            pass
    return {"results": {}}


def meets(key: str, value: float | None) -> bool | None:
    if value is None or key not in TARGETS:
        return None
    op, bound = TARGETS[key]
    return value >= bound if op == ">=" else value <= bound


def record(key: str, value: float | None, raw: dict, *, script: str, quick: bool, threads: int,
           out_dir=None, note: str | None = None) -> dict:
    """Merge one headline into results.json (value, target, raw figures, when, how) and re-render
    results.md. Returns the entry."""
    op, bound = TARGETS.get(key, ("", None))
    entry = {
        "value": None if value is None else round(float(value), 4),
        "target": f"{op} {bound}" if bound is not None else None,
        "meets_target": meets(key, value),
        "description": DESCRIPTIONS.get(key, ""),
        "raw": raw,
        "script": script, "quick": quick, "threads": threads, "measured_at": now_utc(),
        "machine": machine_info(threads),
        "command": " ".join([Path(sys.executable).name, "-m", f"benchmarks.{Path(script).stem}", *sys.argv[1:]]),
    }
    if note:
        entry["note"] = note
    data = load_results(out_dir)
    data.setdefault("results", {})[key] = entry
    write_results(data, out_dir)
    return entry


def write_results(data: dict, out_dir=None) -> None:
    path, md = results_paths(out_dir)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    md.write_text(render_markdown(data))


def _fmt(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def render_markdown(data: dict) -> str:
    res = data.get("results", {})
    lines = ["# posttrain benchmarks", ""]
    run = data.get("run")
    if run:
        m = run.get("machine", {})
        lines += [
            f"- command: `{run.get('command')}`",
            f"- date (UTC): {run.get('date')}",
            f"- machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB; "
            f"{m.get('threads')} threads per side; load average at start {m.get('load_average')}",
            "- versions: " + ", ".join(f"{k} {v}" for k, v in (m.get("versions") or {}).items() if v),
            f"- code: {m.get('git_commit')}{' (uncommitted changes)' if m.get('git_dirty') else ''}"
            + ("; QUICK mode (small sizes, few repetitions: smoke numbers, not results)" if run.get("quick") else ""),
            "",
        ]
    lines += ["| headline | value | target | met | raw figures (medians) |", "|---|---|---|---|---|"]
    for key in TARGETS:
        e = res.get(key)
        if e is None:
            lines.append(f"| `{key}` | not measured | {TARGETS[key][0]} {TARGETS[key][1]} | — | |")
            continue
        met = {True: "yes", False: "**no**", None: "—"}[e.get("meets_target")]
        lines.append(f"| `{key}` | {_fmt(e.get('value'))} | {e.get('target') or ''} | {met} | {e.get('summary', _summary(e))} |")
    lines += ["", "Each value is a ratio of medians over repetitions after warm-up; both sides of a comparison",
              "ran on the same model, data, batch, lengths, precision and thread count, back to back in one run.",
              "`results.json` holds every raw figure and repetition. Regenerate with `make bench`.", ""]
    notes = [(k, e["note"]) for k, e in res.items() if e.get("note")]
    if notes:
        lines += ["Notes:", ""] + [f"- `{k}`: {n}" for k, n in notes] + [""]
    return "\n".join(lines)


def _summary(entry: dict) -> str:
    s = entry.get("raw", {}).get("summary")
    return s if isinstance(s, str) else ""
