"""RL settings sweep from a finished run's SFT checkpoint (how the r1 GRPO and rlhf PPO settings
were chosen).

Each spec is `name|key=value;key=value` with `--set`-style overrides of the recipe. For each one:
train the recipe's `--stage` (grpo, or ppo with `--reward-model`) from the run's SFT output on the
run's train problems, then
evaluate on the run's held-out problems exactly as the flow does (greedy pass@1, pass@8 at
temperature 1, 256 problems), and print one line with the mean training reward per quarter of
the run.

    .venv/bin/python -m benchmarks.grpo_sweep --state-dir .posttrain \
        "base|" "steps150|grpo.max_steps=150" "drgrpo|grpo.scale_rewards=none;grpo.max_steps=100"
    .venv/bin/python -m benchmarks.grpo_sweep --state-dir .posttrain --recipe rlhf --stage ppo \
        --reward-model .posttrain/work/reward_model-<key>/output "lam1|ppo.lam=1.0"

Outputs go under --out (default /tmp/grpo-sweep/<name>). Not part of `make bench`: it measures
accuracy, not speed, and takes minutes per spec.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def _newest(path_glob: str, root: Path) -> Path:
    found = sorted(root.glob(path_glob), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"{root}: nothing matches {path_glob} (run `make run` first)")
    return found[-1]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--state-dir", default=".posttrain", type=Path)
    ap.add_argument("--recipe", default="r1")
    ap.add_argument("--out", default="/tmp/grpo-sweep", type=Path)
    ap.add_argument("--sft", default=None, type=Path,
                    help="the SFT output dir to start from (default: the newest work/sft-*/output of --state-dir)")
    ap.add_argument("--stage", default="grpo", choices=("grpo", "ppo"))
    ap.add_argument("--reward-model", default=None, type=Path,
                    help="ppo: the reward_model stage's output dir (default: the newest work/reward_model-*/output)")
    args = ap.parse_args(argv)
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str((args.state_dir / "torch_extensions").resolve()))

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from models.data import builtin_task
    from models.config import load_recipe, resolved
    from models.generation.evaluation import evaluate
    from models.training.launch import run_training
    from tasks.data import builtin_dir

    base = args.sft or _newest("work/sft-*/output", args.state_dir)
    for spec in args.specs:
        name, _, overrides = spec.partition("|")
        recipe = load_recipe(args.recipe, [o for o in overrides.split(";") if o])
        cfg = resolved(getattr(recipe, args.stage))
        data = builtin_dir(recipe.task, args.state_dir / "datasets")  # the recipe's own splits
        prompts = data / "train_problems.jsonl"
        test = [json.loads(line) for line in (data / "test_problems.jsonl").open()]
        workdir = args.out / name
        t0 = time.perf_counter()
        train_spec = {"config": cfg, "base_path": str(base), "prompts_path": str(prompts), "workdir": str(workdir)}
        if args.stage == "ppo" and cfg.get("reward_model_weight", 0) and not cfg.get("reward_model"):
            train_spec["reward_model_path"] = str(
                args.reward_model or _newest("work/reward_model-*/output", args.state_dir))
        res = run_training(f"models.recipes.{args.stage}:train_{args.stage}", train_spec, 1, str(workdir))
        seconds = time.perf_counter() - t0
        model = AutoModelForCausalLM.from_pretrained(res["output_dir"])
        tok = AutoTokenizer.from_pretrained(res["output_dir"])
        met, _ = evaluate(model, tok, test, builtin_task.verify, builtin_task.extract_answer, num_problems=256,
                          k=8, temperature=1.0, max_new_tokens=72, batch_size=128, seed=1234)
        rows = [json.loads(line) for line in (workdir / "metrics.jsonl").open()]
        q = max(1, len(rows) // 4)
        def curve(key: str) -> list[float]:
            return [round(sum(r[key] for r in rows[i : i + q]) / len(rows[i : i + q]), 3)
                    for i in range(0, q * 4, q) if rows[i : i + q]]

        print(json.dumps({"name": name, "overrides": overrides, "train_seconds": round(seconds, 1),
                          "pass@1": met["pass@1"], "pass@8": met["pass@8"],
                          "reward_by_quarter": curve("reward_mean"), "accuracy_by_quarter": curve("accuracy")}),
              flush=True)


if __name__ == "__main__":
    main()
