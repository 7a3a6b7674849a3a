"""Where an SFT step of the bench's setup spends its time: one process, the bench base and batches
of `bench_sft.py` (batch 16, the same seeded order), posttrain's step function on a DeepSpeed
ZeRO-0 engine, eager or with `--compile`. Prints the median step time, the model GFLOP/s and MFU
(against a 4096² matmul measured at the end, as `bench_sft.py` counts them), and with `--profile`
the `torch.profiler` table of `--profile-steps` steps taken after the timed ones.

Not part of `make bench` (no TRL side, no alternation): a tool for reading a profile. Examples:

    python -m benchmarks.profile_sft --steps 150              # eager
    python -m benchmarks.profile_sft --steps 150 --compile
    python -m benchmarks.profile_sft --steps 60 --compile --profile
"""

from __future__ import annotations

import argparse
import statistics
import time

from benchmarks import common
from benchmarks.bench_sft import LR, MAX_SEQ_LEN, matmul_peak, model_shape, plan, sft_rows, step_flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=150, help="timed steps (the first --warmup are dropped)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--compile", action="store_true", help="torch_compile: true (engine.compile, dynamic shapes)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table after the timed steps")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=common.default_threads())
    a = ap.parse_args()
    common.quiet_libraries()
    common.pin_threads(a.threads)

    import torch

    from models.engine import StepContext, deepspeed_config, ensure_distributed_env, trim_engine

    ensure_distributed_env()
    import deepspeed
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.config import SFTConfig
    from models.packing import verify
    from models.recipes.sft import lm_step_fn, tokenize_examples

    total = a.steps + (a.profile_steps if a.profile else 0)
    base = str(common.bench_base(threads=a.threads))
    rows = sft_rows(4096)
    pl = plan(base, rows, total, common.SFT_BATCH)
    tok = AutoTokenizer.from_pretrained(base)
    examples, _ = tokenize_examples(rows, "prompt_completion", tok, MAX_SEQ_LEN, True)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    verify(model)
    cfg = SFTConfig(max_steps=total, batch_size=common.SFT_BATCH, micro_batch_size=common.SFT_BATCH, lr=LR,
                    warmup_steps=0, lr_schedule="constant", num_threads=a.threads)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    trim_engine(engine, 1)
    if a.compile:
        engine.compile(compile_kwargs={"dynamic": True})
    step_fn = lm_step_fn(tok.pad_token_id)

    def step(s: int) -> None:
        batch = [examples[i] for i in pl["order"][s]]
        loss, _ = step_fn(engine, batch, StepContext(s, 0, 0, 1, 1, batch, 1.0))
        engine.backward(loss)
        engine.step()

    times = []
    for s in range(a.steps):
        t0 = time.perf_counter()
        step(s)
        times.append(time.perf_counter() - t0)
    shape = model_shape(base)
    kept = range(a.warmup, a.steps)
    flops = [step_flops(shape, pl["tokens"][i], pl["sq_lens"][i]) / times[i] for i in kept]
    if a.profile:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            for s in range(a.steps, total):
                step(s)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    peak = matmul_peak(a.threads, 4096)["gflops"]
    med = statistics.median(flops) / 1e9
    print(f"{'compiled' if a.compile else 'eager'}: median step {1000 * statistics.median(times[a.warmup:]):.1f} ms "
          f"over {len(kept)} steps; {med:.1f} model GFLOP/s; matmul peak {peak:.1f} GFLOP/s; MFU {med / peak:.3f}")


if __name__ == "__main__":
    main()
