"""Orchestration: a cached rerun as a fraction of the first run, and the Prefect + MLflow share of
a training stage's wall time.

One fresh state dir (a brand-new Prefect database and MLflow store, as on a fresh clone; the
compiled DeepSpeed ops are shared with the repo's `.posttrain/torch_extensions`, so the first run
does not include compiling `shm_comm`, which makes the rerun fraction a little larger, not smaller):

1. the first run: `posttrain run r1 --state-dir S --summary-json ...` (whole command, wall clock:
   interpreter start, imports, Prefect's temporary API server, every stage, every evaluation);
2. the rerun of exactly the same command, every stage a cache hit.

`cached_rerun_fraction` = rerun wall ÷ first-run wall. For `orchestration_overhead_fraction` the
first run goes through `benchmarks._timed_cli`, which times each training stage's task call in the
flow (Prefect task run, MLflow stage run, metric and artifact logging, output digest) and, inside
it, the recipe (`run_training`: model load, DeepSpeed init, the training loop, consolidation); the
fraction is Σ (task call − recipe) ÷ Σ task call over the training stages (sft, grpo, refine), and
every stage's figure is reported beside it.

By default (what `make bench` records) the default recipe `r1` at its full size (~7 min on a quiet
2-core machine); `--quick` runs its `--smoke` size instead (~2 min). One repetition: these are
minutes-long whole-pipeline timings, not micro-benchmarks (`--reps` repeats the rerun only).

    python -m benchmarks.bench_orchestration [--quick] [--recipe r1]
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import common, headlines

TRAIN_STAGES = ("sft", "grpo", "dpo", "ppo", "reward_model", "refine")


def run_cli(args: list[str], env: dict, timings: Path | None = None, timeout: float = 7200) -> float:
    cmd = [sys.executable, "-m", "benchmarks._timed_cli", *args]
    if timings is not None:
        env = dict(env, BENCH_TIMINGS=str(timings))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True, timeout=timeout)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
    return wall


def main() -> None:
    ap = common.base_args(__doc__)
    ap.add_argument("--recipe", default="r1")
    ap.add_argument("--keep", action="store_true", help="keep the state dir (printed)")
    a = ap.parse_args()
    reps = a.reps or 1
    tmp = Path(tempfile.mkdtemp(prefix="bench-orch-"))
    state = tmp / "state"
    env = common.child_env(a.threads, TORCH_EXTENSIONS_DIR=str(common.OPS_DIR), PREFECT_LOGGING_LEVEL="WARNING")
    cli = ["run", a.recipe, "--state-dir", str(state), "--no-progress"] + (["--smoke"] if a.quick else [])
    try:
        first_timings = tmp / "first.jsonl"
        first = run_cli(cli + ["--summary-json", str(tmp / "first-summary.json")], env, first_timings)
        reruns = [run_cli(cli + ["--summary-json", str(tmp / f"rerun-{i}.json")], env, tmp / f"rerun-{i}.jsonl")
                  for i in range(reps)]
        rows = [json.loads(ln) for ln in first_timings.read_text().splitlines() if ln.strip()]
        rerun_rows = [json.loads(ln) for ln in (tmp / "rerun-0.jsonl").read_text().splitlines() if ln.strip()]
        summary = json.loads((tmp / "rerun-0.json").read_text())
    finally:
        if not a.keep:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"state kept in {tmp}")

    rerun = common.summarize(reruns, 0)
    all_cached = all(r["cached"] for r in summary["stages"])
    value = rerun["median"] / first
    size = f"{a.recipe}{' --smoke' if a.quick else ''}"
    raw = {
        "first_run_seconds": first, "rerun_seconds": rerun["median"], "reruns": rerun, "recipe": size,
        "rerun_all_stages_cached": all_cached,
        "rerun_stage_seconds": sum(r["call_seconds"] for r in rerun_rows),
        "summary": f"`posttrain run {size}`: first {first:.1f} s, cached rerun {rerun['median']:.1f} s "
                   f"(stages {sum(r['call_seconds'] for r in rerun_rows):.2f} s of it)",
    }
    headlines.record("cached_rerun_fraction", value, raw, script=__file__, quick=a.quick, threads=a.threads,
                  out_dir=a.out, note=None if all_cached else "the rerun was NOT all cache hits")
    print(f"cached_rerun_fraction = {value:.4f}  ({raw['summary']})")

    stages = [r for r in rows if r["stage"] in TRAIN_STAGES and r["recipe_seconds"] is not None and not r["cached"]]
    per_stage = {r["stage"]: {"task_seconds": r["call_seconds"], "recipe_seconds": r["recipe_seconds"],
                              "overhead_seconds": r["call_seconds"] - r["recipe_seconds"],
                              "fraction": (r["call_seconds"] - r["recipe_seconds"]) / r["call_seconds"]}
                 for r in stages}
    total = sum(s["task_seconds"] for s in per_stage.values())
    over = sum(s["overhead_seconds"] for s in per_stage.values())
    frac = over / total if total else None
    raw2 = {
        "overhead_seconds": over, "training_stage_seconds": total, "per_stage": per_stage, "recipe": size,
        "all_task_calls": rows,
        "summary": f"{over:.2f} s of {total:.1f} s over {', '.join(per_stage)} ("
                   + ", ".join(f"{k} {v['fraction'] * 100:.1f}%" for k, v in per_stage.items()) + ")",
    }
    headlines.record("orchestration_overhead_fraction", frac, raw2, script=__file__, quick=a.quick, threads=a.threads,
                  out_dir=a.out)
    print(f"orchestration_overhead_fraction = {frac if frac is None else round(frac, 4)}  ({raw2['summary']})")


if __name__ == "__main__":
    main()
