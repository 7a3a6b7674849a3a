"""DPO throughput (policy tokens/s), posttrain vs TRL's DPOTrainer.

Both sides train the bench base on the same preference pairs of the built-in task (chosen: the
worked solution; rejected: the worked solution of the question with its first digit changed, so a
well-formed wrong answer), 16 pairs per step (32 sequences in one concatenated forward), sigmoid
loss, β = 0.1, AdamW (0.9/0.95, clip 1.0), constant lr, fp32, the same threads, every step logged,
never saving. They see identical batches (posttrain's seeded order, TRL `sequential`).

What differs by design, and is reported beside the ratio: TRL's default runs the frozen reference
model forward on every step; posttrain computes the reference log-probs once per pair before the
loop (`ref_precompute_seconds`, not in its step time) and keeps no reference model. With
`--trl-precompute` (the default outside --quick) the TRL side also runs with
`precompute_ref_log_probs=True`, its best setting, and that ratio is recorded too (`vs_trl_precomputed`).

Tokens/s = input tokens (no padding) of chosen + rejected rows of a step ÷ its time, median over
the steps after warm-up; a step is the wall time from one optimizer step's end to the next.

`--model smollm2` (issue #16): SmolLM2-135M-Instruct (the packaged GGUF, fp32) on the same pairs in
TRL's conversational form (the question as a user message, chosen and rejected as assistant
messages, rendered with its chat template on both sides), 8 pairs per step, lr 1e-6, one round;
key `dpo_tokens_speedup_vs_trl_smollm2`.

    python -m benchmarks.bench_dpo [--quick] [--reps N] [--rounds R] [--trl-precompute] [--model smollm2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchmarks import common, headlines

KEY = "dpo_tokens_speedup_vs_trl"
LR = 1e-5
BETA = 0.1
MAX_SEQ_LEN = 160
SMOLLM2 = {"lr": 1e-6, "batch": 8, "max_seq_len": 320}


def pairs(n: int, chat: bool = False) -> list[dict]:
    from models.data.builtin_task import solution_for

    out = []
    for p in common.problems(n):
        q = p["prompt"].removeprefix("Q: ").removesuffix("\nA:")
        wrong = str((int(q[0]) + 1) % 10) + q[1:]
        row = {"prompt": p["prompt"], "chosen": p["solution"], "rejected": solution_for(wrong)}
        if chat:  # TRL's conversational preference format
            row = {"prompt": [{"role": "user", "content": row["prompt"]}],
                   "chosen": [{"role": "assistant", "content": row["chosen"]}],
                   "rejected": [{"role": "assistant", "content": row["rejected"]}]}
        out.append(row)
    return out


def plan(base: str, rows: list[dict], steps: int, batch: int, seed: int = 0, max_seq_len: int = MAX_SEQ_LEN) -> dict:
    """posttrain's per-step batches (pair indices) and their input tokens (chosen + rejected)."""
    from transformers import AutoTokenizer

    from models.training.batching import EpochSampler
    from models.data.preference_pairs import tokenize_pairs

    tok = AutoTokenizer.from_pretrained(base)
    items, dropped = tokenize_pairs(rows, tok, max_seq_len)
    assert not dropped and len(items) == len(rows)
    sampler = EpochSampler(len(items), seed)
    order = [sampler.indices(s * batch, batch) for s in range(steps)]
    return {"order": order,
            "tokens": [sum(len(items[i]["chosen"][0]) + len(items[i]["rejected"][0]) for i in idx) for idx in order]}


def posttrain_side(p: dict) -> dict:
    import models.recipes.dpo as dpo
    from models.training.distributed import ensure_distributed_env
    from models.training.engine import read_metrics
    from models.recipes.preference_config import DPOConfig

    ensure_distributed_env()
    data = common.write_jsonl(p["rows"], Path(p["tmp"]) / "pairs.jsonl")
    spent = {}
    inner = dpo.reference_logps

    def timed_reference(*args, **kw):  # instrumentation only: how long the one-off reference pass takes
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        spent["ref"] = time.perf_counter() - t0
        return out

    dpo.reference_logps = timed_reference
    cfg = DPOConfig(dataset=str(data), max_steps=p["steps"], batch_size=p["batch"], micro_batch_size=p["batch"],
                    lr=p.get("lr", LR), beta=BETA, warmup_steps=0, lr_schedule="constant", save_every=10**6,
                    log_every=1, max_seq_len=p.get("max_seq_len", MAX_SEQ_LEN), num_threads=p["threads"], seed=0)
    res = dpo.train_dpo({"config": cfg.model_dump(), "base_path": p["base"], "dataset_path": str(data),
                         "workdir": str(Path(p["tmp"]) / "work")})
    rows = read_metrics(res["metrics_path"])
    return {"step_seconds": [r["step_seconds"] for r in rows], "losses": [r["loss"] for r in rows],
            "ref_precompute_seconds": spent.get("ref"), "pairs": res["num_examples"]}


def trl_side(p: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [p["rows"][i] for idx in p["order"] for i in idx]
    model = AutoModelForCausalLM.from_pretrained(p["base"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(p["base"])
    timer = common.trl_step_timer()
    args = DPOConfig(
        **common.trl_common_args(p["tmp"], p["steps"], p["threads"], learning_rate=p.get("lr", LR),
                                 per_device_train_batch_size=p["batch"], gradient_accumulation_steps=1,
                                 train_sampling_strategy="sequential"),
        beta=BETA, loss_type=["sigmoid"], max_length=p.get("max_seq_len", MAX_SEQ_LEN), dataset_num_proc=None,
        precompute_ref_log_probs=bool(p.get("precompute")),
    )
    t0 = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[timer])
    init_s = time.perf_counter() - t0
    trainer.train()
    losses = [lg["loss"] for lg in trainer.state.log_history if "loss" in lg]
    return {"step_seconds": timer.step_seconds, "losses": losses, "init_seconds": init_s}


def main() -> None:
    ap = common.base_args(__doc__)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--trl-precompute", action=argparse.BooleanOptionalAction, default=None,
                    help="also run TRL with precompute_ref_log_probs=True (default: on, off with --quick)")
    ap.add_argument("--no-trl", action="store_true")
    common.add_model_arg(ap)
    a = ap.parse_args()
    real = a.model == "smollm2"
    if a.trl_precompute is None:
        a.trl_precompute = not a.quick
    common.quiet_libraries()
    warmup = a.warmup if a.warmup is not None else (1 if a.quick or real else 3)
    reps = a.reps or (3 if a.quick else 4 if real else 12)
    rounds = a.rounds or (1 if a.quick or real else 2)
    if real:
        base, batch = str(common.smollm2_dir()), SMOLLM2["batch"]
        extra = {"lr": SMOLLM2["lr"], "max_seq_len": SMOLLM2["max_seq_len"]}
    else:
        base = str(common.bench_base(steps=30 if a.quick else common.BASE_SFT_STEPS, small=a.quick, threads=a.threads))
        batch, extra = common.DPO_PAIRS, {}
    steps = warmup + reps
    rows = pairs(batch * steps, chat=real)  # one epoch: every pair is seen once
    pl = plan(base, rows, steps, batch, max_seq_len=extra.get("max_seq_len", MAX_SEQ_LEN))
    payload = {"base": base, "rows": rows, "order": pl["order"], "steps": steps, "batch": batch, **extra}
    trl_ok, trl_why = common.have_trl()
    use_trl = trl_ok and not a.no_trl

    runs: dict[str, list[dict]] = {"posttrain": [], "trl": [], "trl_precomputed": []}
    for _ in range(rounds):
        runs["posttrain"].append(common.run_worker("benchmarks.bench_dpo", "posttrain", payload, a.threads))
        if use_trl:
            runs["trl"].append(common.run_worker("benchmarks.bench_dpo", "trl", payload, a.threads))
            if a.trl_precompute:
                runs["trl_precomputed"].append(
                    common.run_worker("benchmarks.bench_dpo", "trl", dict(payload, precompute=True), a.threads))

    def tps(side: str) -> dict | None:
        vals = [pl["tokens"][i] / t for r in runs[side] for i, t in enumerate(r["step_seconds"]) if i >= warmup]
        return common.summarize(vals, 0) if vals else None

    ours = tps("posttrain")
    ref_s = [r["ref_precompute_seconds"] for r in runs["posttrain"]]
    raw = {
        "posttrain_tokens_per_s": ours["median"], "pairs_per_step": batch,
        "posttrain_step_seconds": common.summarize([t for r in runs["posttrain"] for t in r["step_seconds"][warmup:]], 0)["median"],
        "posttrain_ref_precompute_seconds": ref_s, "posttrain_ref_precompute_pairs": len(rows),
        "posttrain": {"tokens_per_s": ours, "first_losses": [r["losses"][:2] for r in runs["posttrain"]]},
        "rounds": rounds, "warmup_steps_dropped_per_worker": warmup, "base": str(base),
        "median_tokens_per_step": sorted(pl["tokens"])[len(pl["tokens"]) // 2],
    }
    value, note = None, None
    if use_trl:
        trl = tps("trl")
        value = common.ratio(ours["median"], trl["median"])
        raw.update({
            "trl_tokens_per_s": trl["median"],
            "trl_step_seconds": common.summarize([t for r in runs["trl"] for t in r["step_seconds"][warmup:]], 0)["median"],
            "trl": {"tokens_per_s": trl, "first_losses": [r["losses"][:2] for r in runs["trl"]]},
        })
        summary = f"posttrain {ours['median']:,.0f} vs TRL {trl['median']:,.0f} policy tok/s ({batch} pairs/step)"
        if runs["trl_precomputed"]:
            pre = tps("trl_precomputed")
            raw["vs_trl_precomputed"] = common.ratio(ours["median"], pre["median"])
            raw["trl_precomputed_tokens_per_s"] = pre["median"]
            raw["trl_precomputed"] = {"tokens_per_s": pre, "init_seconds": [r["init_seconds"] for r in runs["trl_precomputed"]]}
            summary += f"; TRL with precomputed reference {pre['median']:,.0f}"
        raw["summary"] = summary
        note = ("TRL's default runs the reference model every step; posttrain precomputes reference log-probs "
                f"once before training ({ref_s[0]:.2f} s for {len(rows)} pairs, outside the step time)")
    else:
        note = trl_why if not trl_ok else "--no-trl"
        raw["summary"] = f"posttrain {ours['median']:,.0f} policy tok/s; TRL side not run"
    key = common.key_for(KEY, a.model)
    e = headlines.record(key, value, raw, script=__file__, quick=a.quick, threads=a.threads, out_dir=a.out, note=note)
    print(f"{key} = {e['value']}  ({raw['summary']})")


if __name__ == "__main__" and not common.worker_main({"posttrain": posttrain_side, "trl": trl_side}):
    main()
