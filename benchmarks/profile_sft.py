"""Where an SFT step of the bench's setup spends its time: one process running posttrain's SFT
(`train_sft`, the loop `bench_sft.py` times) on the bench base and its batches (batch 16, the same
seeded order), eager or with `--compile`. Prints the median step time (run_loop's `step_seconds`),
the model GFLOP/s and MFU (against a 4096² matmul measured at the end, as `bench_sft.py` counts
them), and with `--profile` the `torch.profiler` table of `--profile-steps` steps taken after the
timed ones (the final checkpoint and save fall outside it).

Not part of `make bench` (no TRL side, no alternation): a tool for reading a profile. Examples:

    python -m benchmarks.profile_sft --steps 150              # eager
    python -m benchmarks.profile_sft --steps 150 --compile
    python -m benchmarks.profile_sft --steps 60 --compile --profile
    python -m benchmarks.profile_sft --model smollm2 --steps 6 --warmup 2 --profile --profile-steps 2
"""

from __future__ import annotations

import argparse
import statistics

from benchmarks import common
from benchmarks.bench_sft import matmul_peak, model_shape, plan, posttrain_side, settings, sft_rows, step_flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="timed steps (the first --warmup are dropped)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch_compile: true (engine.compile, dynamic shapes)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table after the timed steps")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=common.default_threads())
    common.add_model_arg(ap)
    a = ap.parse_args()
    common.quiet_libraries()
    common.pin_threads(a.threads)

    import tempfile

    import torch

    total = a.steps + (a.profile_steps if a.profile else 0)
    base, batch, lr, max_seq_len = settings(a.model, False, a.threads)
    rows = sft_rows(4096, a.model)
    pl = plan(base, rows, total, batch, max_seq_len=max_seq_len)
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def on_log(row: dict) -> None:  # called after each optimizer step (log_every 1), before any save
        if a.profile and row["step"] == a.steps:
            prof.__enter__()
        if a.profile and row["step"] == total:
            prof.__exit__(None, None, None)

    with tempfile.TemporaryDirectory() as tmp:
        side = posttrain_side({"base": base, "rows": rows, "steps": total, "batch": batch, "tmp": tmp, "lr": lr,
                               "max_seq_len": max_seq_len, "threads": a.threads, "torch_compile": a.compile},
                              on_log=on_log)
    times = side["step_seconds"][: a.steps]
    if a.profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    shape = model_shape(base)
    kept = range(a.warmup, a.steps)
    flops = [step_flops(shape, pl["tokens"][i], pl["sq_lens"][i]) / times[i] for i in kept]
    peak = matmul_peak(a.threads, 4096)["gflops"]
    med = statistics.median(flops) / 1e9
    print(f"{'compiled' if a.compile else 'eager'}: median step {1000 * statistics.median(times[a.warmup:]):.1f} ms "
          f"over {len(kept)} steps; {med:.1f} model GFLOP/s; matmul peak {peak:.1f} GFLOP/s; MFU {med / peak:.3f}")


if __name__ == "__main__":
    main()
