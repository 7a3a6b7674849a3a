"""Per-rank parameter + optimizer memory: ZeRO-3 on 2 processes vs ZeRO-0 on 1.

Both train the bench base with posttrain's SFT step on the engine loop (`run_loop`, the shipped
`zero0.json` / `zero3.json`, fp32, AdamW) for 2 steps; after the first optimizer step (when the
Adam moments exist) every rank counts the bytes of the distinct tensor storages that hold

* parameters: each parameter's data and, under ZeRO-3, its partition (`ds_tensor`);
* optimizer: the fp32 master partitions DeepSpeed keeps (if any) and every tensor in the torch
  optimizer's state (Adam's exp_avg, exp_avg_sq, step).

Storages are de-duplicated by address, so a view (ZeRO-3's flat partition buffers, fp32 masters that
*are* the parameters) is counted once. Gradients and activations are reported beside it, not in
the ratio. The value is the largest rank's ZeRO-3 bytes ÷ ZeRO-0's bytes. This is a count, not a
timing, so it is not repeated.

    python -m benchmarks.bench_memory [--quick]
"""

from __future__ import annotations

import json
import os
import resource
from pathlib import Path

from benchmarks import common, headlines

KEY = "zero3_memory_fraction"


def _storage_bytes(tensors) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if t is None or not hasattr(t, "untyped_storage") or t.numel() == 0:
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def engine_memory(engine) -> dict:
    """Bytes of parameters, optimizer state (incl. master copies) and gradients on this rank."""
    import torch

    params = list(engine.module.parameters())
    param_tensors = [p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]
    zopt = engine.optimizer
    inner = zopt if isinstance(zopt, torch.optim.Optimizer) else getattr(zopt, "optimizer", zopt)
    state = [v for s in getattr(inner, "state", {}).values() for v in s.values() if torch.is_tensor(v)]
    masters = list(getattr(zopt, "fp32_partitioned_groups_flat", []) or []) + list(
        getattr(zopt, "single_partition_of_fp32_groups", []) or [])
    param_b = _storage_bytes(param_tensors)
    both_b = _storage_bytes(param_tensors + masters + state)
    grads = [p.grad for p in params] + list(getattr(zopt, "grad_partitions_flat_buffer", None) is not None
                                            and [zopt.grad_partitions_flat_buffer] or [])
    return {
        "param_bytes": param_b, "optimizer_bytes": both_b - param_b, "param_plus_optimizer_bytes": both_b,
        "grad_bytes": _storage_bytes(grads), "numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params),
        "zero_stage": engine.zero_optimization_stage(),
        "persistent_params": sum(1 for p in params if getattr(p, "ds_persist", False)),
        "params": len(params), "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def measure_target(spec: dict, on_log=None) -> dict:
    """A run_training target: posttrain's SFT step on run_loop, counting memory after step 1."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.config import SFTConfig
    from models.training.engine import run_loop
    from models.training.batching import EpochSampler
    from models.training.checkpoints import save_hf_dir
    from models.training.lm_loss import lm_step_fn
    from models.recipes.sft import tokenize_examples

    cfg = SFTConfig.model_validate(spec["config"])
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(spec["base_path"])
    rows = [json.loads(ln) for ln in Path(spec["dataset_path"]).read_text().splitlines()]
    examples, _ = tokenize_examples(rows, "prompt_completion", tok, cfg.max_seq_len, True)
    model = AutoModelForCausalLM.from_pretrained(spec["base_path"], dtype=torch.float32)
    sampler = EpochSampler(len(examples), 0)
    rank = int(os.environ.get("RANK", 0))
    out = Path(spec["workdir"]) / f"memory-rank{rank}.json"

    def after_step(engine, step):
        if step == 0:
            out.write_text(json.dumps(engine_memory(engine)))

    res = run_loop(model, cfg, spec["workdir"], lambda s: [examples[i] for i in sampler.indices(s * cfg.batch_size, cfg.batch_size)],
                   lm_step_fn(tok.pad_token_id), save_hf_dir(tok, spec["base_path"]), after_step=after_step)
    return {"output_dir": res.output_dir}


def run_case(base: str, data: Path, workdir: Path, world: int, deepspeed: str) -> list[dict]:
    from models.config import SFTConfig
    from models.training.launch import run_training

    cfg = SFTConfig(max_steps=2, batch_size=8, micro_batch_size=8 // world, lr=1e-4, warmup_steps=0,
                    save_every=10**6, max_seq_len=160, world_size=world, deepspeed=deepspeed)
    spec = {"config": cfg.model_dump(), "base_path": base, "dataset_path": str(data), "workdir": str(workdir)}
    run_training("benchmarks.bench_memory:measure_target", spec, world, workdir)
    return [json.loads((workdir / f"memory-rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    import subprocess
    import sys
    import tempfile

    ap = common.base_args(__doc__)
    ap.add_argument("--case", choices=["zero0", "zero3"], help=argparse_hidden())
    ap.add_argument("--result")
    a = ap.parse_args()
    common.quiet_libraries()
    base = str(common.bench_base(steps=30 if a.quick else common.BASE_SFT_STEPS, small=a.quick, threads=a.threads))
    if a.case:  # a clean child process per case: the 1-process case makes this process rank 0 of 1
        from models.training.distributed import ensure_distributed_env

        with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
            data = common.write_jsonl([{"prompt": p["prompt"], "completion": p["solution"]} for p in common.problems(64)],
                                      Path(tmp) / "sft.jsonl")
            world = 2 if a.case == "zero3" else 1
            if world == 1:
                ensure_distributed_env()
            ranks = run_case(base, data, Path(tmp) / a.case, world, f"{a.case}.json")
        Path(a.result).write_text(json.dumps(ranks))
        return
    cases = {}
    with tempfile.TemporaryDirectory(prefix="bench-mem-") as tmp:
        for case in ("zero0", "zero3"):
            res = Path(tmp) / f"{case}.json"
            cmd = [sys.executable, "-m", "benchmarks.bench_memory", "--case", case, "--result", str(res)]
            if a.quick:
                cmd.append("--quick")
            p = subprocess.run(cmd, cwd=common.REPO, env=common.child_env(a.threads), capture_output=True, text=True,
                               timeout=1800)
            if p.returncode != 0:
                raise RuntimeError(f"{cmd} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
            cases[case] = json.loads(res.read_text())
    z0 = cases["zero0"][0]["param_plus_optimizer_bytes"]
    z3 = max(r["param_plus_optimizer_bytes"] for r in cases["zero3"])
    value = common.ratio(z3, z0)
    raw = {
        "zero0_bytes": z0, "zero3_max_rank_bytes": z3, "zero0": cases["zero0"], "zero3_per_rank": cases["zero3"],
        "params": cases["zero0"][0]["numel"], "precision": "fp32", "optimizer": "torch AdamW (client optimizer)",
        "summary": f"ZeRO-3 ×2 {z3 / 2**20:.2f} MiB/rank vs ZeRO-0 {z0 / 2**20:.2f} MiB "
                   f"({cases['zero0'][0]['numel'] / 1e6:.2f}M params)",
    }
    e = headlines.record(KEY, value, raw, script=__file__, quick=a.quick, threads=a.threads, out_dir=a.out)
    print(f"{KEY} = {e['value']}  ({raw['summary']})")


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
