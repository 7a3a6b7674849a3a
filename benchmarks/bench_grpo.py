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

`--model smollm2` (issue #16): SmolLM2-135M-Instruct (the packaged GGUF, fp32), each built-in problem
as a one-message conversation rendered with its chat template on both sides, 8 prompts × 4
completions of up to 64 new tokens (the issue asks 128; halved so that a GRPO step of a 135M model
on 2 CPU cores stays under a minute and `make bench` under an hour), stopping at the template's
end-of-turn token, lr 1e-6, β = 0, then the same with LoRA on both sides (r 16, alpha 32, all
linear layers). The reward is a continuous one both sides compute alike (the completion's distinct
characters ÷ 64): the built-in verifier gives this model nothing but zeros, which would make every
group zero-std and let posttrain skip the whole backward, a saving a real run would not see. The
peak resident memory of each side's worker process is recorded beside its step time. Keys
`grpo_step_speedup_vs_trl_smollm2`, `grpo_lora_step_speedup_vs_trl_smollm2` and
`grpo_peak_rss_ratio_vs_trl_smollm2` (full fine-tuning, posttrain ÷ TRL).

    python -m benchmarks.bench_grpo [--quick] [--reps N] [--rounds R] [--betas 0,0.04] [--model smollm2]
"""

from __future__ import annotations

import statistics
from pathlib import Path

from benchmarks import common, headlines

KEY, LORA_KEY, RSS_KEY = "grpo_step_speedup_vs_trl", "grpo_lora_step_speedup_vs_trl", "grpo_peak_rss_ratio_vs_trl"
LR = 3e-5
SMOLLM2 = {"lr": 1e-6, "num_prompts": 8, "g": 4, "max_new": 64}
BENCH_REWARD = "bench_distinct_chars"


def distinct_chars(completion: str) -> float:
    """The SmolLM2 comparison's reward: continuous, so no group of 4 is zero-std."""
    return len(set(completion)) / 64


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
    real = p.get("model") == "smollm2"
    if real:
        from models.rewards import register_reward

        register_reward(BENCH_REWARD)(lambda prompt, completion, reference: distinct_chars(completion))
    cfg = GRPOConfig(num_prompts=p["num_prompts"], num_generations=p["g"], max_new_tokens=p["max_new"],
                     beta=p["beta"], lr=p.get("lr", LR), max_steps=p["steps"], save_every=10**6, log_every=1,
                     log_rollouts=0, num_threads=p["threads"], seed=0, lora=p.get("lora"),
                     **({"rewards": {BENCH_REWARD: 1.0}, "stop_strings": []} if real else {}))
    res = grpo.train_grpo({"config": cfg.model_dump(), "base_path": p["base"], "prompts_path": str(probs),
                           "workdir": str(Path(p["tmp"]) / "work")})
    rows = read_metrics(res["metrics_path"])
    from models.training.packing import STATS

    return {"packing": dict(STATS), "step_seconds": [r["step_seconds"] for r in rows], "generate_seconds": gen_s,
            "completion_length": [r["completion_length"] for r in rows], "reward": [r["reward_mean"] for r in rows],
            "frac_zero_std": [r["frac_zero_std"] for r in rows], "peak_rss_mib": common.peak_rss_mib()}


def trl_side(p: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from models.data.builtin_task import verify

    def builtin_task(prompts, completions, answer, **kw):
        return [float(verify(pr, c, a) or 0.0) for pr, c, a in zip(prompts, completions, answer)]

    def bench_distinct_chars(prompts, completions, **kw):  # conversational: [{"role", "content"}]
        return [distinct_chars(c[0]["content"] if isinstance(c, list) else c) for c in completions]

    model = AutoModelForCausalLM.from_pretrained(p["base"], dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(p["base"])
    timer = common.trl_step_timer()
    n = p["num_prompts"] * p["g"]
    args = GRPOConfig(
        **common.trl_common_args(p["tmp"], p["steps"], p["threads"], learning_rate=p.get("lr", LR),
                                 per_device_train_batch_size=n, gradient_accumulation_steps=1),
        num_generations=p["g"], max_completion_length=p["max_new"], temperature=1.0, top_p=1.0, top_k=0,
        beta=p["beta"], epsilon=0.2, epsilon_high=0.28, loss_type="dapo", scale_rewards="group",
        num_iterations=1, steps_per_generation=None, log_completions=False, mask_truncated_completions=False,
    )
    reward = bench_distinct_chars if p.get("model") == "smollm2" else builtin_task
    trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args,
                          train_dataset=Dataset.from_list([{"prompt": r["prompt"], "answer": r["answer"]} for r in p["problems"]]),
                          processing_class=tok, callbacks=[timer],
                          peft_config=common.peft_lora_config() if p.get("lora") else None)
    gen_s: list[float] = []
    trainer._generate_single_turn = common.timed_calls(trainer._generate_single_turn, gen_s)  # instrumentation only
    trainer.train()
    logs = [lg for lg in trainer.state.log_history if "completions/mean_length" in lg]
    return {"step_seconds": timer.step_seconds, "generate_seconds": gen_s,
            "completion_length": [lg["completions/mean_length"] for lg in logs],
            "reward": [lg.get("reward") for lg in logs],
            "frac_zero_std": [lg.get("frac_reward_zero_std") for lg in logs], "peak_rss_mib": common.peak_rss_mib()}


def _side_summary(rs: list[dict], warmup: int) -> dict:
    secs = [t for r in rs for t in r["step_seconds"][warmup:]]
    gens = [t for r in rs for t in r["generate_seconds"][warmup:]]
    lens = [x for r in rs for x in r["completion_length"][warmup:]]
    zs = [x for r in rs for x in r["frac_zero_std"][warmup:] if x is not None]
    rss = [r["peak_rss_mib"] for r in rs if r.get("peak_rss_mib")]
    return {"step_seconds": common.summarize(secs, 0),
            "computed_per_real_token": common.computed_per_real_token(rs[0].get("packing")),
            "generate_seconds": common.summarize(gens, 0) if gens else None,
            "mean_completion_length": statistics.fmean(lens) if lens else None,
            "mean_frac_zero_std_groups": statistics.fmean(zs) if zs else None,
            "peak_rss_mib": max(rss) if rss else None,
            "rewards": [r["reward"] for r in rs]}


def main() -> None:
    ap = common.base_args(__doc__)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--betas", default=None, help="comma-separated β values (default 0,0.04; smollm2: 0)")
    ap.add_argument("--no-trl", action="store_true")
    common.add_model_arg(ap)
    a = ap.parse_args()
    common.quiet_libraries()
    real = a.model == "smollm2"
    warmup = a.warmup if a.warmup is not None else (1 if a.quick or real else 2)
    reps = a.reps or (2 if a.quick else 3 if real else 6)
    rounds = a.rounds or 1
    steps = warmup + reps
    if real:
        num_prompts, g, max_new = SMOLLM2["num_prompts"], SMOLLM2["g"], SMOLLM2["max_new"]
        if a.quick:
            max_new = 16
        base = str(common.smollm2_dir())
        probs = common.chat_problems(max(64, num_prompts * steps * 2), offset=20_000)
    else:
        num_prompts, g, max_new = (4, 4, 24) if a.quick else (common.NUM_PROMPTS, common.NUM_GENERATIONS, common.MAX_NEW_TOKENS)
        base = str(common.bench_base(steps=30 if a.quick else common.BASE_SFT_STEPS, small=a.quick, threads=a.threads))
        probs = common.problems(max(256, num_prompts * steps * 2), offset=20_000)
    trl_ok, trl_why = common.have_trl()
    use_trl = trl_ok and not a.no_trl
    betas = [float(b) for b in (a.betas or ("0" if real else "0,0.04")).split(",") if b.strip()]
    variants = {"full": {}, "lora": {"lora": common.LORA}} if real else {"full": {}}

    by_variant: dict[str, dict[str, dict]] = {}
    for v, extra in variants.items():
        by_beta = by_variant.setdefault(v, {})
        for beta in betas:
            payload = {"base": base, "problems": probs, "steps": steps, "num_prompts": num_prompts, "g": g,
                       "max_new": max_new, "beta": beta, "model": a.model, **extra,
                       **({"lr": SMOLLM2["lr"]} if real else {})}
            runs: dict[str, list[dict]] = {"posttrain": [], "trl": []}
            for _ in range(rounds):
                runs["posttrain"].append(common.run_worker("benchmarks.bench_grpo", "posttrain", payload, a.threads))
                if use_trl:
                    runs["trl"].append(common.run_worker("benchmarks.bench_grpo", "trl", payload, a.threads))
            entry = {side: _side_summary(rs, warmup) for side, rs in runs.items() if rs}
            entry["speedup"] = (common.ratio(entry["trl"]["step_seconds"]["median"], entry["posttrain"]["step_seconds"]["median"])
                                if "trl" in entry else None)
            by_beta[f"beta={beta:g}"] = entry

    note = None if use_trl else (trl_why if not trl_ok else "--no-trl")
    batch = {"prompts": num_prompts, "generations": g, "max_new_tokens": max_new}
    for v, by_beta in by_variant.items():
        speedups = [e["speedup"] for e in by_beta.values() if e["speedup"] is not None]
        value = min(speedups) if speedups else None  # the headline is the worse of the β settings
        b0 = by_beta.get("beta=0") or next(iter(by_beta.values()))
        raw = {
            "posttrain_seconds_per_step": b0["posttrain"]["step_seconds"]["median"],
            "trl_seconds_per_step": b0.get("trl", {}).get("step_seconds", {}).get("median"),
            "by_beta": by_beta, "batch": batch, "lora": variants[v].get("lora"),
            "rounds": rounds, "warmup_steps_dropped_per_worker": warmup, "base": base,
            "summary": "; ".join(
                f"{k}: posttrain {e['posttrain']['step_seconds']['median']:.2f} s"
                + (f" vs TRL {e['trl']['step_seconds']['median']:.2f} s/step (×{e['speedup']:.2f})" if e.get("trl") else "")
                for k, e in by_beta.items()) + (f" (LoRA r {common.LORA['r']})" if v == "lora" else ""),
        }
        key = common.key_for(LORA_KEY if v == "lora" else KEY, a.model)
        e = headlines.record(key, value, raw, script=__file__, quick=a.quick, threads=a.threads, out_dir=a.out, note=note)
        print(f"{key} = {e['value']}  ({raw['summary']})")
    if real:
        b0 = next(iter(by_variant["full"].values()))
        ours_rss, trl_rss = b0["posttrain"]["peak_rss_mib"], b0.get("trl", {}).get("peak_rss_mib")
        raw = {"posttrain_peak_rss_mib": ours_rss, "trl_peak_rss_mib": trl_rss, "batch": batch,
               "lora": {v: {side: e.get(side, {}).get("peak_rss_mib") for side in ("posttrain", "trl")}
                        for v, bb in by_variant.items() for e in [next(iter(bb.values()))]},
               "measure": "ru_maxrss of each side's worker process (model load, generation and update)",
               "summary": f"posttrain {ours_rss:,.0f} MiB" + (f" vs TRL {trl_rss:,.0f} MiB peak RSS" if trl_rss else "")}
        key = common.key_for(RSS_KEY, a.model)
        e = headlines.record(key, common.ratio(ours_rss, trl_rss), raw, script=__file__, quick=a.quick,
                             threads=a.threads, out_dir=a.out, note=note)
        print(f"{key} = {e['value']}  ({raw['summary']})")


if __name__ == "__main__" and not common.worker_main({"posttrain": posttrain_side, "trl": trl_side}):
    main()
