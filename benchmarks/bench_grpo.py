"""GRPO step (generate G completions per prompt + score + policy update): posttrain vs TRL's
GRPOTrainer, at β = 0 and at β > 0.

Both sides: the bench base (common.bench_base), prompts of the built-in task, 16 prompts × 8
completions = 128 sequences per step, up to 72 new tokens, temperature 1, top_k 0, top_p 1, stop on
EOS and `</answer>` (the base's generation config; TRL reads it too), the built-in verifier as the
only reward, group-scaled advantages, clip ε 0.2 / ε_high 0.28, token-mean loss over the batch
(TRL `dapo`), one update per generation batch (μ = 1), one micro-batch of 128, AdamW (0.9/0.95,
clip 1.0), lr 3e-5 constant, fp32, the same threads, metrics logged every step, never saving.
β > 0 (0.04, the GRPO paper's) loads the frozen reference model on both sides.

What differs by design (each exact: same distribution, same loss and gradient up to float rounding):
posttrain computes what rows share once, both when sampling (the G samples of a prompt share one
prefill and one decoding row while their tokens agree) and in the update (a prefix-tree layout: each
prompt once, the samples' common first tokens once; `computed_per_real_token` reports the token
slots its forwards ran per real token), and gives the rows of zero-std groups (all 8 rewards
equal: advantage 0, weight 0 under its default `skip_zero_std_groups`) no backward, since their
gradient is exactly zero (β = 0; at β > 0 they are out of its loss by that setting); TRL computes
them. The fraction of such groups is reported on both sides (`mean_frac_zero_std_groups`; the bench
base gives ~25%, the r1 recipe's GRPO stage ~14%). How much is shared depends on the policy: these
savings are large on the built-in task, whose policies agree with themselves on most tokens.

A step is the wall time from one optimizer step's end to the next (posttrain: run_loop's
`step_seconds`; TRL: TrainerCallback on_step_end marks), the median after the warm-up steps.
Generation time is measured beside it on both sides (instrumentation wrappers only) and so are the
completion lengths, which show the two sides sampled comparable workloads.

    python -m benchmarks.bench_grpo [--quick] [--reps N] [--rounds R] [--betas 0,0.04]
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks import common, headlines

KEY = "grpo_step_speedup_vs_trl"
LR = 3e-5


def posttrain_side(p: dict) -> dict:
    import models.recipes.grpo as grpo
    from models.training.distributed import ensure_distributed_env
    from models.training.engine import read_metrics
    from models.recipes.rl_config import GRPOConfig

    ensure_distributed_env()
    probs = common.write_jsonl([{k: r[k] for k in ("id", "prompt", "answer")} for r in p["problems"]],
                               Path(p["tmp"]) / "problems.jsonl")
    gen_s: list[float] = []
    grpo.sample = common.timed_calls(grpo.sample, gen_s)  # instrumentation only
    cfg = GRPOConfig(num_prompts=p["num_prompts"], num_generations=p["g"], max_new_tokens=p["max_new"],
                     beta=p["beta"], lr=LR, max_steps=p["steps"], save_every=10**6, log_every=1, log_rollouts=0,
                     num_threads=p["threads"], seed=0)
    res = grpo.train_grpo({"config": cfg.model_dump(), "base_path": p["base"], "prompts_path": str(probs),
                           "workdir": str(Path(p["tmp"]) / "work")})
    rows = read_metrics(res["metrics_path"])
    from models.training.packing import STATS

    return {"packing": dict(STATS), "step_seconds": [r["step_seconds"] for r in rows], "generate_seconds": gen_s,
            "completion_length": [r["completion_length"] for r in rows], "reward": [r["reward_mean"] for r in rows],
            "frac_zero_std": [r["frac_zero_std"] for r in rows]}


def trl_side(p: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from models.data.builtin_task import verify

    def builtin_task(prompts, completions, answer, **kw):
        return [float(verify(pr, c, a) or 0.0) for pr, c, a in zip(prompts, completions, answer)]

    model = AutoModelForCausalLM.from_pretrained(p["base"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(p["base"])
    timer = common.trl_step_timer()
    n = p["num_prompts"] * p["g"]
    args = GRPOConfig(
        **common.trl_common_args(p["tmp"], p["steps"], p["threads"], learning_rate=LR,
                                 per_device_train_batch_size=n, gradient_accumulation_steps=1),
        num_generations=p["g"], max_completion_length=p["max_new"], temperature=1.0, top_p=1.0, top_k=0,
        beta=p["beta"], epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        num_iterations=1, steps_per_generation=None, log_completions=False, mask_truncated_completions=False,
    )
    trainer = GRPOTrainer(model=model, reward_funcs=[builtin_task], args=args,
                          train_dataset=Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in p["problems"]]),
                          processing_class=tok, callbacks=[timer])
    gen_s: list[float] = []
    trainer._generate_single_turn = common.timed_calls(trainer._generate_single_turn, gen_s)  # instrumentation only
    trainer.train()
    logs = [lg for lg in trainer.state.log_history if "completions/mean_length" in lg]
    return {"step_seconds": timer.step_seconds, "generate_seconds": gen_s,
            "completion_length": [lg["completions/mean_length"] for lg in logs],
            "reward": [lg.get("reward") for lg in logs],
            "frac_zero_std": [lg.get("frac_reward_zero_std") for lg in logs]}


def main() -> None:
    ap = common.base_args(__doc__)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--betas", default="0,0.04", help="comma-separated β values (default 0,0.04)")
    ap.add_argument("--no-trl", action="store_true")
    a = ap.parse_args()
    common.quiet_libraries()
    warmup = a.warmup if a.warmup is not None else (1 if a.quick else 2)
    reps = a.reps or (2 if a.quick else 6)
    rounds = a.rounds or 1
    steps = warmup + reps
    num_prompts, g, max_new = (4, 4, 24) if a.quick else (common.NUM_PROMPTS, common.NUM_GENERATIONS, common.MAX_NEW_TOKENS)
    base = str(common.bench_base(steps=30 if a.quick else common.BASE_SFT_STEPS, small=a.quick, threads=a.threads))
    probs = common.problems(max(256, num_prompts * steps * 2), offset=20_000)
    trl_ok, trl_why = common.have_trl()
    use_trl = trl_ok and not a.no_trl
    betas = [float(b) for b in a.betas.split(",") if b.strip()]

    by_beta: dict[str, dict] = {}
    for beta in betas:
        payload = {"base": base, "problems": probs, "steps": steps, "num_prompts": num_prompts, "g": g,
                   "max_new": max_new, "beta": beta}
        runs: dict[str, list[dict]] = {"posttrain": [], "trl": []}
        for _ in range(rounds):
            runs["posttrain"].append(common.run_worker("benchmarks.bench_grpo", "posttrain", payload, a.threads))
            if use_trl:
                runs["trl"].append(common.run_worker("benchmarks.bench_grpo", "trl", payload, a.threads))
        entry = {}
        for side, rs in runs.items():
            if not rs:
                continue
            secs = [t for r in rs for t in r["step_seconds"][warmup:]]
            gens = [t for r in rs for t in r["generate_seconds"][warmup:]]
            lens = [x for r in rs for x in r["completion_length"][warmup:]]
            zs = [x for r in rs for x in r["frac_zero_std"][warmup:] if x is not None]
            entry[side] = {"step_seconds": common.summarize(secs, 0),
                           "computed_per_real_token": common.computed_per_real_token(rs[0].get("packing")),
                           "generate_seconds": common.summarize(gens, 0) if gens else None,
                           "mean_completion_length": statistics.fmean(lens) if lens else None,
                           "mean_frac_zero_std_groups": statistics.fmean(zs) if zs else None,
                           "rewards": [r["reward"] for r in rs]}
        entry["speedup"] = (common.ratio(entry["trl"]["step_seconds"]["median"], entry["posttrain"]["step_seconds"]["median"])
                            if "trl" in entry else None)
        by_beta[f"beta={beta:g}"] = entry

    speedups = [e["speedup"] for e in by_beta.values() if e["speedup"] is not None]
    value = min(speedups) if speedups else None  # the headline is the worse of the β settings
    b0 = by_beta.get("beta=0") or next(iter(by_beta.values()))
    raw = {
        "posttrain_seconds_per_step": b0["posttrain"]["step_seconds"]["median"],
        "trl_seconds_per_step": b0.get("trl", {}).get("step_seconds", {}).get("median"),
        "by_beta": by_beta,
        "batch": {"prompts": num_prompts, "generations": g, "max_new_tokens": max_new},
        "rounds": rounds, "warmup_steps_dropped_per_worker": warmup, "base": base,
        "summary": "; ".join(
            f"{k}: posttrain {e['posttrain']['step_seconds']['median']:.2f} s"
            + (f" vs TRL {e['trl']['step_seconds']['median']:.2f} s/step (×{e['speedup']:.2f})" if e.get("trl") else "")
            for k, e in by_beta.items()),
    }
    note = None if use_trl else (trl_why if not trl_ok else "--no-trl")
    e = headlines.record(KEY, value, raw, script=__file__, quick=a.quick, threads=a.threads, out_dir=a.out, note=note)
    print(f"{KEY} = {e['value']}  ({raw['summary']})")


if __name__ == "__main__" and not common.worker_main({"posttrain": posttrain_side, "trl": trl_side}):
    main()
