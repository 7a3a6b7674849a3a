"""SFT throughput (tokens/s), posttrain vs TRL's SFTTrainer, and posttrain's SFT MFU.

Both sides train the bench base on the built-in task's prompt/completion data (completion-only
loss, EOS appended, BOS from the tokenizer, right padding to the longest row of the batch), batch
16, AdamW (betas 0.9/0.95, clip 1.0), constant lr, fp32, the same thread count, logging every step
and never saving. They see *identical batches*: the parent computes posttrain's per-step order (its
seeded epoch sampler) and hands TRL the rows in that order with `train_sampling_strategy=sequential`;
the first-step losses are reported side by side as a check that both optimise the same objective.

Each side is one worker process (back to back, `--rounds` times alternately); a step is the wall
time from one optimizer step's end to the next (posttrain: run_loop's `step_seconds`; TRL: a
TrainerCallback's on_step_end marks), so data loading, forward, backward, optimizer and logging are
all in it. The first `--warmup` steps are dropped; tokens/s = input tokens (no padding) of a step ÷
its time, median over the measured steps.

MFU: model FLOPs per step = 6 · params · tokens + attention 12 · layers · hidden · Σ len² (the
PaLM count, fwd + bwd, full not causal attention), over the median step time, ÷ the fp32 peak of
this machine measured in this run with a large `torch.matmul` (2 · n³ FLOPs) on the same threads.
The headline MFU is posttrain's SFT with `torch_compile: true` (a third worker per round, the same
batches; compiling falls in the dropped warm-up steps, and a recompile for a new packed shape is one
outlier step the median ignores); the eager MFU, from the TRL-comparison worker, is beside it. The
tokens/s ratio against TRL is eager against eager (TRL's default).

`--model smollm2` (issue #16): SmolLM2-135M-Instruct (the packaged GGUF, fp32) on conversational
prompt/completion rows of ~200 tokens (four built-in problems per conversation, GSM8K's length), the
prompt rendered with its chat template on both sides, batch 8, lr 1e-5, then the same with LoRA on
both sides (r 16, alpha 32, all linear layers; posttrain's `lora:` section, TRL's `peft_config`).
Keys `sft_tokens_speedup_vs_trl_smollm2`, `sft_lora_tokens_speedup_vs_trl_smollm2` and
`sft_mfu_smollm2` (eager: compiling a 135M model costs minutes on a CPU, so no compiled worker).

    python -m benchmarks.bench_sft [--quick] [--reps N] [--rounds R] [--threads T] [--model smollm2]
"""

from __future__ import annotations

import time
from pathlib import Path

from benchmarks import common, headlines

KEY, MFU_KEY, LORA_KEY = "sft_tokens_speedup_vs_trl", "sft_mfu", "sft_lora_tokens_speedup_vs_trl"
LR = 1e-3
MAX_SEQ_LEN = 160
# SmolLM2: lr, batch and length (its ~200-token rows fit; nothing is cut).
SMOLLM2 = {"lr": 1e-5, "batch": 8, "max_seq_len": 320}


# ----------------------------------------------------------------------------- data and the shared order


def settings(model: str, quick: bool, threads: int) -> tuple[str, int, float, int]:
    """(base dir, batch, lr, max_seq_len) of the SFT comparison for `--model`."""
    if model == "smollm2":
        return str(common.smollm2_dir()), SMOLLM2["batch"], SMOLLM2["lr"], SMOLLM2["max_seq_len"]
    base = common.bench_base(steps=30 if quick else common.BASE_SFT_STEPS, small=quick, threads=threads)
    return str(base), common.SFT_BATCH, LR, MAX_SEQ_LEN


def sft_rows(n: int, model: str = "builtin") -> list[dict]:
    if model == "smollm2":
        return common.chat_sft_rows(n)
    return [{"prompt": p["prompt"], "completion": p["solution"]} for p in common.problems(n)]


def plan(base: str, rows: list[dict], steps: int, batch: int, seed: int = 0, max_seq_len: int = MAX_SEQ_LEN) -> dict:
    """posttrain's per-step batches (row indices), their input tokens and Σ len² (for attention FLOPs)."""
    from transformers import AutoTokenizer

    from models.training.batching import EpochSampler
    from models.recipes.sft import tokenize_examples

    tok = AutoTokenizer.from_pretrained(base)
    examples, dropped = tokenize_examples(rows, "prompt_completion", tok, max_seq_len, True)
    assert not dropped and len(examples) == len(rows)
    assert all(len(ids) < max_seq_len for ids, _ in examples), "a row was cut: raise max_seq_len"
    sampler = EpochSampler(len(examples), seed)
    order = [sampler.indices(s * batch, batch) for s in range(steps)]
    return {
        "order": order,
        "tokens": [sum(len(examples[i][0]) for i in idx) for idx in order],
        "padded_tokens": [len(idx) * max(len(examples[i][0]) for i in idx) for idx in order],
        "sq_lens": [sum(len(examples[i][0]) ** 2 for i in idx) for idx in order],
    }


# ----------------------------------------------------------------------------- workers


def posttrain_side(p: dict, on_log=None) -> dict:
    from models.config import SFTConfig
    from models.training.distributed import ensure_distributed_env
    from models.training.engine import read_metrics
    from models.recipes.sft import train_sft

    ensure_distributed_env()
    data = common.write_jsonl(p["rows"], Path(p["tmp"]) / "sft.jsonl")
    cfg = SFTConfig(max_steps=p["steps"], batch_size=p["batch"], micro_batch_size=p["batch"], lr=p["lr"],
                    warmup_steps=0, lr_schedule="constant", save_every=10**6, log_every=1,
                    max_seq_len=p["max_seq_len"], num_threads=p["threads"], seed=0,
                    torch_compile=p.get("torch_compile", False), lora=p.get("lora"))
    res = train_sft({"config": cfg.model_dump(), "base_path": p["base"], "dataset_path": str(data),
                     "workdir": str(Path(p["tmp"]) / "work")}, on_log=on_log)
    rows = read_metrics(res["metrics_path"])
    from models.training.packing import STATS

    return {"step_seconds": [r["step_seconds"] for r in rows], "losses": [r["loss"] for r in rows],
            "packing": dict(STATS), "peak_rss_mib": common.peak_rss_mib()}


def trl_side(p: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [p["rows"][i] for idx in p["order"] for i in idx]
    model = AutoModelForCausalLM.from_pretrained(p["base"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(p["base"])
    timer = common.trl_step_timer()
    logs: list[dict] = []

    from transformers import TrainerCallback

    class Logs(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "loss" in logs:
                logs_copy = dict(logs, step=state.global_step)
                store.append(logs_copy)

    store = logs
    args = SFTConfig(
        **common.trl_common_args(p["tmp"], p["steps"], p["threads"], learning_rate=p["lr"],
                                 per_device_train_batch_size=p["batch"], gradient_accumulation_steps=1,
                                 train_sampling_strategy="sequential"),
        max_length=p["max_seq_len"], packing=False, completion_only_loss=True, dataset_num_proc=None,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[timer, Logs()], peft_config=common.peft_lora_config() if p.get("lora") else None)
    trainer.train()
    return {"step_seconds": timer.step_seconds, "losses": [lg["loss"] for lg in logs],
            "num_tokens": [lg.get("num_tokens") for lg in logs], "peak_rss_mib": common.peak_rss_mib()}


# ----------------------------------------------------------------------------- peak and MFU


def matmul_peak(threads: int, n: int, warmup: int = 2, reps: int = 5) -> dict:
    """fp32 GFLOP/s of an n × n @ n × n torch.matmul on `threads` threads (median of reps)."""
    import torch

    common.pin_threads(threads)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    out = torch.empty(n, n)
    times = []
    for _ in range(warmup + reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        times.append(time.perf_counter() - t0)
    s = common.summarize(times, warmup)
    return {"n": n, "gflops": 2 * n**3 / s["median"] / 1e9, "seconds": s}


def model_shape(base: str) -> dict:
    """Parameters (tied embeddings counted once), layers and width of the model in `base`."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    cfg = model.config
    return {"params": sum(p.numel() for p in model.parameters()), "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size}


def step_flops(shape: dict, tokens: int, sq_lens: int) -> float:
    return 6.0 * shape["params"] * tokens + 12.0 * shape["layers"] * shape["hidden"] * sq_lens


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = common.base_args(__doc__)
    ap.add_argument("--rounds", type=int, default=None, help="alternate the two workers this many times")
    ap.add_argument("--no-trl", action="store_true", help="posttrain side and MFU only")
    common.add_model_arg(ap)
    a = ap.parse_args()
    common.quiet_libraries()
    real = a.model == "smollm2"
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2 if real else 3)
    reps = a.reps or (3 if a.quick else 4 if real else 15)
    rounds = a.rounds or (1 if a.quick or real else 2)
    steps = warmup + reps
    base, batch, lr, max_seq_len = settings(a.model, a.quick, a.threads)
    rows = sft_rows(512 if a.quick else 4096, a.model)
    pl = plan(base, rows, steps, batch, max_seq_len=max_seq_len)
    payload = {"base": base, "rows": rows, "order": pl["order"], "steps": steps, "batch": batch, "lr": lr,
               "max_seq_len": max_seq_len}
    trl_ok, trl_why = common.have_trl()
    use_trl = trl_ok and not a.no_trl

    variants = {"full": {}, "lora": {"lora": common.LORA}} if real else {"full": {}}
    sides: dict[str, dict[str, list[dict]]] = {v: {"posttrain": [], "trl": [], "compiled": []} for v in variants}
    for _ in range(rounds):
        for v, extra in variants.items():
            sides[v]["posttrain"].append(common.run_worker("benchmarks.bench_sft", "posttrain", dict(payload, **extra), a.threads))
            if not real:  # compiling a 135M model takes minutes on a CPU: SmolLM2's MFU is eager
                sides[v]["compiled"].append(common.run_worker(
                    "benchmarks.bench_sft", "posttrain", dict(payload, torch_compile=True), a.threads))
            if use_trl:
                sides[v]["trl"].append(common.run_worker("benchmarks.bench_sft", "trl", dict(payload, **extra), a.threads))
    peak = matmul_peak(a.threads, 1024 if a.quick else 4096)

    def per_step_tps(runs: list[dict]) -> list[float]:
        out = []
        for r in runs:  # drop each worker's warm-up steps, pool the rest
            out += [pl["tokens"][i] / t for i, t in enumerate(r["step_seconds"]) if i >= warmup]
        return out

    shape = model_shape(base)

    def flops(runs: list[dict]) -> dict:
        return common.summarize([step_flops(shape, pl["tokens"][i], pl["sq_lens"][i]) / t
                                 for r in runs for i, t in enumerate(r["step_seconds"]) if i >= warmup], 0)

    full = sides["full"]
    ours = common.summarize(per_step_tps(full["posttrain"]), 0)
    eager_flops = flops(full["posttrain"])
    mfu_flops = flops(full["compiled"]) if full["compiled"] else eager_flops
    mfu = mfu_flops["median"] / (peak["gflops"] * 1e9)
    eager_mfu = eager_flops["median"] / (peak["gflops"] * 1e9)
    tokens_med = sorted(pl["tokens"][warmup:])[len(pl["tokens"][warmup:]) // 2]
    computed = common.computed_per_real_token(full["posttrain"][0].get("packing"))
    compiled = bool(full["compiled"])
    mfu_raw = {
        "model_gflops_per_s": mfu_flops["median"] / 1e9, "matmul_peak_gflops": peak["gflops"], "peak": peak,
        "computed_per_real_token": computed,  # token slots run through the model per real token (packing)
        "hfu_estimate": mfu * computed if computed else None,  # FLOPs actually executed ÷ peak (approx.)
        "model": shape, "flop_count": "6*params*tokens + 12*layers*hidden*sum(len^2) per step (fwd+bwd)",
        "torch_compile": compiled, "eager_mfu": eager_mfu, "eager_model_gflops_per_s": eager_flops["median"] / 1e9,
        "compiled_tokens_per_s": common.summarize(per_step_tps(full["compiled"]), 0)["median"] if compiled else None,
        "posttrain_tokens_per_s": ours["median"], "batch": batch,
        "summary": f"{'torch_compile' if compiled else 'eager'}: {mfu_flops['median'] / 1e9:.1f} model GFLOP/s of a "
                   f"{peak['gflops']:.1f} GFLOP/s {peak['n']}² matmul peak (eager {eager_mfu:.3f}; "
                   f"{shape['params'] / 1e6:.2f}M params, batch {batch})",
    }
    mfu_key = common.key_for(MFU_KEY, a.model)
    headlines.record(mfu_key, mfu, mfu_raw, script=__file__, quick=a.quick, threads=a.threads, out_dir=a.out)
    print(f"{mfu_key} = {round(mfu, 4)}  ({mfu_raw['summary']})")

    for v, runs in sides.items():
        mine = common.summarize(per_step_tps(runs["posttrain"]), 0)
        secs = [t for r in runs["posttrain"] for t in r["step_seconds"][warmup:]]
        raw = {
            "posttrain_tokens_per_s": mine["median"], "posttrain_step_seconds": common.summarize(secs, 0)["median"],
            "batch": batch, "median_tokens_per_step": tokens_med, "lr": lr, "max_seq_len": max_seq_len,
            "padding_fraction": 1 - sum(pl["tokens"]) / sum(pl["padded_tokens"]),
            "posttrain": {"tokens_per_s": mine, "first_losses": [r["losses"][:3] for r in runs["posttrain"]],
                          "peak_rss_mib": [r.get("peak_rss_mib") for r in runs["posttrain"]]},
            "rounds": rounds, "warmup_steps_dropped_per_worker": warmup, "base": base,
            "lora": variants[v].get("lora"),
        }
        value = note = None
        if use_trl:
            trl = common.summarize(per_step_tps(runs["trl"]), 0)
            trl_secs = [t for r in runs["trl"] for t in r["step_seconds"][warmup:]]
            value = common.ratio(mine["median"], trl["median"])
            tok_check = runs["trl"][0]["num_tokens"]
            trl_step_tokens = [b - a for a, b in zip([0] + tok_check[:-1], tok_check)] if all(tok_check) else None
            raw.update({
                "trl_tokens_per_s": trl["median"], "trl_step_seconds": common.summarize(trl_secs, 0)["median"],
                "trl": {"tokens_per_s": trl, "first_losses": [r["losses"][:3] for r in runs["trl"]],
                        "peak_rss_mib": [r.get("peak_rss_mib") for r in runs["trl"]],
                        "tokens_per_step_match": trl_step_tokens == pl["tokens"] if trl_step_tokens else None},
                "summary": f"posttrain {mine['median']:,.0f} vs TRL {trl['median']:,.0f} tok/s (batch {batch}, "
                           f"~{tokens_med} tokens/step{', LoRA r ' + str(common.LORA['r']) if v == 'lora' else ''})",
            })
        else:
            note = trl_why if not trl_ok else "--no-trl"
            raw["summary"] = f"posttrain {mine['median']:,.0f} tok/s; TRL side not run ({note})"
        key = common.key_for(LORA_KEY if v == "lora" else KEY, a.model)
        e = headlines.record(key, value, raw, script=__file__, quick=a.quick, threads=a.threads, out_dir=a.out, note=note)
        print(f"{key} = {e['value']}  ({raw['summary']})")


if __name__ == "__main__" and not common.worker_main({"posttrain": posttrain_side, "trl": trl_side}):
    main()
