"""Rollout generation: new tokens/s at the GRPO batch, posttrain's sampler vs `model.generate`.

Both sides, in this one process, alternating repetition by repetition: the bench base (see
common.bench_base), 16 prompts × 8 samples = 128 sequences, up to 72 new tokens, temperature 1,
top_k 0, top_p 1, stopping on EOS and on `</answer>`, fp32, the same thread count.
`model.generate` gets exactly what TRL's GRPOTrainer gives it: every prompt repeated G times, left
padded, its default dynamic KV cache. New tokens are counted up to and including each row's stop
token, the same way on both sides (generate's padding after a finished row is not counted).

`--model smollm2` (issue #16): SmolLM2-135M-Instruct (the packaged GGUF, fp32), 8 built-in problems
× 4 samples, up to 64 new tokens (GRPO's SmolLM2 batch, bench_grpo.py), each prompt a one-message
conversation rendered with its chat template (the same ids on both sides, left padded for
`generate`), stopping on every end-of-turn id of its generation config; key
`rollout_speedup_vs_generate_smollm2`.

    python -m benchmarks.bench_rollout [--quick] [--reps N] [--threads T] [--model smollm2]
"""

from __future__ import annotations

import time

from benchmarks import common, headlines

KEY = "rollout_speedup_vs_generate"


def measure(base, threads: int, warmup: int, reps: int, num_prompts: int, g: int, max_new: int,
            chat: bool = False) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.generation.rollouts import SamplingParams, _eos_ids, sample
    from models.modeling.chat import encode_prompt

    common.pin_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    if chat:  # prompt ids rendered with the chat template; stop on every end-of-turn id
        stop_ids = sorted(_eos_ids(model, tok))
        params = SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=0, stop_strings=())
        sets = [[encode_prompt(tok, p["prompt"], "auto")
                 for p in common.chat_problems(num_prompts, offset=10_000 + i * num_prompts)]
                for i in range(warmup + reps)]
    else:
        stop_ids = sorted({tok.eos_token_id, tok.convert_tokens_to_ids("</answer>")})
        params = SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=0, stop_strings=("</answer>",))
        sets = [[p["prompt"] for p in common.problems(num_prompts, offset=10_000 + i * num_prompts)]
                for i in range(warmup + reps)]

    def ours(i: int) -> tuple[float, int, list[int]]:
        t0 = time.perf_counter()
        ro = sample(model, tok, sets[i], g, params, seed=i, batch_size=num_prompts * g)
        dt = time.perf_counter() - t0
        lens = [len(r.completion_ids) for r in ro]
        return dt, sum(lens), lens

    def generate(i: int) -> tuple[float, int, list[int]]:
        rows = [p for p in sets[i] for _ in range(g)]
        t0 = time.perf_counter()
        if chat:  # the same ids, left padded
            enc = common.left_pad(rows, tok.pad_token_id)
        else:
            enc = tok(rows, return_tensors="pt", padding=True, padding_side="left")
        torch.manual_seed(i)
        with torch.no_grad():
            out = model.generate(
                **enc, do_sample=True, max_new_tokens=max_new, temperature=1.0, top_k=0, top_p=1.0,
                eos_token_id=stop_ids, pad_token_id=tok.pad_token_id,
            )
        new = out[:, enc["input_ids"].shape[1]:]
        dt = time.perf_counter() - t0
        is_stop = torch.isin(new, torch.tensor(stop_ids))
        first = torch.where(is_stop.any(1), is_stop.int().argmax(1) + 1, torch.full((new.shape[0],), new.shape[1]))
        lens = first.tolist()
        return dt, sum(lens), lens

    res = {"ours": [], "generate": []}
    for i in range(warmup + reps):  # A B A B: a drift in machine speed hits both sides alike
        res["ours"].append(ours(i))
        res["generate"].append(generate(i))

    out = {}
    for side, runs in res.items():
        tps = [n / dt for dt, n, _ in runs]
        all_lens = [x for _, _, lens in runs[warmup:] for x in lens]
        out[side] = {
            "new_tokens_per_s": common.summarize(tps, warmup),
            "seconds": common.summarize([dt for dt, _, _ in runs], warmup),
            "mean_completion_tokens": sum(all_lens) / max(1, len(all_lens)),
            "frac_max_length": sum(x >= max_new for x in all_lens) / max(1, len(all_lens)),
        }
    return out


def main() -> None:
    ap = common.base_args(__doc__)
    common.add_model_arg(ap)
    a = ap.parse_args()
    common.quiet_libraries()
    real = a.model == "smollm2"
    warmup = a.warmup if a.warmup is not None else 1
    reps = a.reps or (2 if a.quick else 4 if real else 7)
    if real:
        from benchmarks.bench_grpo import SMOLLM2

        num_prompts, g, max_new = SMOLLM2["num_prompts"], SMOLLM2["g"], 16 if a.quick else SMOLLM2["max_new"]
        base = common.smollm2_dir()
    else:
        num_prompts, g, max_new = (4, 4, 24) if a.quick else (common.NUM_PROMPTS, common.NUM_GENERATIONS, common.MAX_NEW_TOKENS)
        base = common.bench_base(steps=30 if a.quick else common.BASE_SFT_STEPS, small=a.quick, threads=a.threads)
    m = measure(base, a.threads, warmup, reps, num_prompts, g, max_new, chat=real)
    ours, gen = m["ours"]["new_tokens_per_s"]["median"], m["generate"]["new_tokens_per_s"]["median"]
    value = common.ratio(ours, gen)
    raw = {
        "posttrain_new_tokens_per_s": ours, "generate_new_tokens_per_s": gen,
        "posttrain_seconds_per_batch": m["ours"]["seconds"]["median"],
        "generate_seconds_per_batch": m["generate"]["seconds"]["median"],
        "batch": {"prompts": num_prompts, "samples_per_prompt": g, "max_new_tokens": max_new},
        "base": str(base), "detail": m,
        "summary": f"posttrain {ours:,.0f} vs generate {gen:,.0f} new tok/s "
                   f"({num_prompts}×{g} seqs, ≤{max_new} new tokens, mean {m['ours']['mean_completion_tokens']:.1f})",
    }
    key = common.key_for(KEY, a.model)
    e = headlines.record(key, value, raw, script=__file__, quick=a.quick, threads=a.threads, out_dir=a.out)
    print(f"{key} = {e['value']}  ({raw['summary']})")


if __name__ == "__main__":
    main()
