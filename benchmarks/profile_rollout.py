"""Where a rollout batch of the bench's setup spends its time: posttrain's sampler (and, with
`--generate`, `model.generate` on the same prompt ids) on one batch, timed, then once more under
`torch.profiler`, printing the table of the ops that took the most time.

Not part of `make bench` (no headline): a tool for reading a profile. Example (SmolLM2, the batch of
`bench_rollout.py --model smollm2`: 8 prompts × 4 samples, ≤ 64 new tokens):

    python -m benchmarks.profile_rollout --model smollm2 --generate
"""

from __future__ import annotations

import time

from benchmarks import common


def main() -> None:
    ap = common.base_args(__doc__)
    common.add_model_arg(ap)
    ap.add_argument("--generate", action="store_true", help="profile model.generate on the same batch too")
    ap.add_argument("--rows", type=int, default=30, help="profiler table rows")
    a = ap.parse_args()
    common.quiet_libraries()
    common.pin_threads(a.threads)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.bench_grpo import SMOLLM2
    from models.generation.rollouts import SamplingParams, _eos_ids, sample
    from models.modeling.chat import encode_prompt

    if a.model == "smollm2":
        base, (n, g, max_new) = common.smollm2_dir(), (SMOLLM2["num_prompts"], SMOLLM2["g"], SMOLLM2["max_new"])
    else:
        base, (n, g, max_new) = common.bench_base(threads=a.threads), (common.NUM_PROMPTS, common.NUM_GENERATIONS,
                                                                        common.MAX_NEW_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    if a.model == "smollm2":
        prompts = [encode_prompt(tok, p["prompt"], "auto") for p in common.chat_problems(n, offset=10_000)]
        params = SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=0, stop_strings=())
    else:
        prompts = [encode_prompt(tok, p["prompt"], "never") for p in common.problems(n, offset=10_000)]
        params = SamplingParams(max_new_tokens=max_new, temperature=1.0, top_p=1.0, top_k=0)
    stop_ids = sorted(_eos_ids(model, tok))
    enc = common.left_pad([p for p in prompts for _ in range(g)], tok.pad_token_id)
    width = enc["input_ids"].shape[1]

    def ours():
        out = sample(model, tok, prompts, g, params, seed=0, batch_size=n * g)
        return sum(len(r.completion_ids) for r in out)

    def generate():
        torch.manual_seed(0)
        with torch.no_grad():
            out = model.generate(**enc, do_sample=True, max_new_tokens=max_new, temperature=1.0, top_k=0, top_p=1.0,
                                 eos_token_id=stop_ids, pad_token_id=tok.pad_token_id)
        return int((out[:, width:] != tok.pad_token_id).sum())

    sides = {"posttrain": ours, **({"generate": generate} if a.generate else {})}
    for name, fn in sides.items():
        fn()  # warm-up
        t0 = time.perf_counter()
        new = fn()
        dt = time.perf_counter() - t0
        print(f"{name}: {n}×{g} rows, {new} new tokens in {dt:.2f} s ({new / dt:.1f} new tok/s)")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))


if __name__ == "__main__":
    main()
