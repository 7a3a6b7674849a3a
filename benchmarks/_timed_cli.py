"""`posttrain` (flows.cli) with timers around two calls, for bench_orchestration.py.

    BENCH_TIMINGS=/path/timings.jsonl python -m benchmarks._timed_cli run r1 --state-dir ...

Appends one JSON row per stage task call: the stage, whether it was cached, the wall time of the
flow's `_call` (Prefect task run + the task body: MLflow stage run, inputs, the model-layer work,
digests, artifacts) and, for training stages, the time inside `run_training` (the recipe itself).
Instrumentation only: the wrapped functions are called unchanged.
"""

from __future__ import annotations

import json
import os
import sys
import time


def main() -> int:
    import flows.post_train as post_train
    import tasks.train as train

    out = os.environ.get("BENCH_TIMINGS")
    inner_s: dict[str, float] = {}
    real_run_training, real_call = train.run_training, post_train._call

    def timed_run_training(target, spec, world_size, workdir, on_log=None):
        t0 = time.perf_counter()
        try:
            return real_run_training(target, spec, world_size, workdir, on_log=on_log)
        finally:
            inner_s[str(workdir)] = time.perf_counter() - t0

    def timed_call(task_fn, kwargs, ctx, config_for_run, inputs, run_name=None):
        inner_s.clear()
        t0 = time.perf_counter()
        result, cached, wall = real_call(task_fn, kwargs, ctx, config_for_run, inputs, run_name)
        row = {"stage": kwargs.get("stage") or run_name, "task": getattr(task_fn, "name", "?"), "cached": cached,
               "call_seconds": time.perf_counter() - t0, "wall_seconds": wall,
               "recipe_seconds": sum(inner_s.values()) if inner_s else None}
        if out:
            with open(out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        return result, cached, wall

    train.run_training, post_train._call = timed_run_training, timed_call
    from flows.cli import main as cli_main

    return cli_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
