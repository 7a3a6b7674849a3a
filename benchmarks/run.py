"""Run every benchmark script and write benchmarks/results.json + benchmarks/results.md.

    python -m benchmarks.run [--quick] [--only grpo,sft] [--threads T] [--out DIR]

Each script runs in its own process, one after the other (none overlaps another: they would share
the cores). A full run starts from an empty results.json so that every headline in it comes from
this run; `--only` merges into the existing one. `make bench` is `python -m benchmarks.run`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from benchmarks import common, headlines

SCRIPTS = {  # name -> (module, its arguments); cheap ones first
    "rollout": ("benchmarks.bench_rollout", []),
    "sft": ("benchmarks.bench_sft", []),
    "dpo": ("benchmarks.bench_dpo", []),
    "grpo": ("benchmarks.bench_grpo", []),
    "memory": ("benchmarks.bench_memory", []),
    "orchestration": ("benchmarks.bench_orchestration", []),
    # SmolLM2-135M-Instruct (issue #16): the same comparisons at a real model's scale, keys `*_smollm2`
    "smollm2-rollout": ("benchmarks.bench_rollout", ["--model", "smollm2"]),
    "smollm2-sft": ("benchmarks.bench_sft", ["--model", "smollm2"]),
    "smollm2-dpo": ("benchmarks.bench_dpo", ["--model", "smollm2"]),
    "smollm2-grpo": ("benchmarks.bench_grpo", ["--model", "smollm2"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="every script in its --quick mode (harness smoke test)")
    ap.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(SCRIPTS)}")
    ap.add_argument("--threads", type=int, default=common.default_threads())
    ap.add_argument("--out", default=None)
    ap.add_argument("--keep-going", action="store_true", help="run the remaining scripts after one fails")
    a, extra = ap.parse_known_args()
    names = [n.strip() for n in a.only.split(",")] if a.only else list(SCRIPTS)
    unknown = set(names) - set(SCRIPTS)
    if unknown:
        ap.error(f"unknown benchmark(s) {sorted(unknown)}; known: {list(SCRIPTS)}")
    data = headlines.load_results(a.out) if a.only else {"results": {}}
    data["run"] = {"command": "make bench" if not (a.quick or a.only or extra) else " ".join(["python -m benchmarks.run", *sys.argv[1:]]),
                   "date": headlines.now_utc(), "quick": a.quick, "machine": headlines.machine_info(a.threads)}
    headlines.write_results(data, a.out)
    failed = []
    for name in names:
        module, args = SCRIPTS[name]
        cmd = [sys.executable, "-m", module, *args, "--threads", str(a.threads), *extra]
        if a.quick:
            cmd.append("--quick")
        if a.out:
            cmd += ["--out", a.out]
        print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
        t0 = time.perf_counter()
        rc = subprocess.call(cmd, cwd=common.REPO, env=common.child_env(a.threads))
        print(f"== {name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
        if rc != 0:
            failed.append(name)
            if not a.keep_going:
                break
    data = headlines.load_results(a.out)
    data["run"]["finished"] = headlines.now_utc()
    data["run"]["failed"] = failed
    headlines.write_results(data, a.out)
    path, md = headlines.results_paths(a.out)
    print(md.read_text())
    print(f"wrote {path} and {md}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
