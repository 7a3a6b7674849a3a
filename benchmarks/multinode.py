"""Multi-node stages on loopback: how long a 2-node stage takes to start, and how long the surviving
node takes to fail the stage when the other dies or freezes.

Node 0 is `run_training` in this process (as in a flow's training stage); node 1 is a separate
`posttrain node-agent --workdir …` process in its own session, started at the same moment as node 0
(it waits for node 0's announcement). The stage is a ZeRO-3 SFT of a small built-in-architecture model
(hidden 64, 2 layers), 2 nodes × 1 rank, batch 8, on 127.0.0.1.

* start: from both nodes starting to the first step's metrics row (the rendezvous, both ranks'
  imports and model load, deepspeed.initialize and one step), against the same stage on one node
  with 2 ranks (`world_size: 2`, torchrun --standalone-like) started the same way;
* kill: node 1's agent process group SIGKILLed after step 3 (its rank dies with it,
  PR_SET_PDEATHSIG): seconds until node 0's run_training raises;
* freeze: node 1's agent and rank SIGSTOPped after step 3 (a machine that hangs or drops off the
  network without closing its sockets): seconds until node 0 fails, with DEEPSPEED_TIMEOUT=1
  (DeepSpeed's collective timeout, in minutes; its default is 10).

    python -m benchmarks.multinode [--only start|kill|freeze] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET = "models.recipes.sft:train_sft"


def _setup(root: Path) -> tuple[Path, Path]:
    from data_contracts.io import write_jsonl_atomic
    from models.data.builtin_task import make_problems
    from models.modeling.tiny_model import build_tiny_model, save_hf
    from models.modeling.tokenizer import build_tokenizer

    tok = build_tokenizer()
    base = root / "base"
    save_hf(build_tiny_model(tok, seed=0, hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128), tok, base)
    train, _ = make_problems(0, 64, 8)
    data = root / "train.jsonl"
    write_jsonl_atomic([{"prompt": p.prompt, "completion": p.solution} for p in train], data)
    return base, data


def _spec(base, data, wd, **over):
    from models.config import SFTConfig

    cfg = SFTConfig(**{"max_steps": 6, "batch_size": 8, "micro_batch_size": 4, "lr": 1e-3, "warmup_steps": 1,
                       "save_every": 2, "max_seq_len": 64, "deepspeed": "zero3.json", "num_threads": 1, **over})
    return {"config": cfg.model_dump(), "base_path": str(base), "dataset_path": str(data), "workdir": str(wd)}


def _agent(wd: Path, log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "node-agent", "--workdir", str(wd), "--wait", "120"],
        cwd=REPO, start_new_session=True, env=dict(os.environ, PYTHONPATH=str(REPO), **env),
        stdout=open(log, "ab"), stderr=subprocess.STDOUT,
    )


def _first_step_watch(wd: Path, t0: float, out: dict, at_step: int | None = None, act=None) -> threading.Thread:
    def go():
        metrics = wd / "metrics.jsonl"
        while True:
            rows = [json.loads(x) for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
            if rows and "first_step_s" not in out:
                out["first_step_s"] = time.monotonic() - t0
            if at_step is not None and rows and rows[-1]["step"] >= at_step:
                out["acted_at"] = time.monotonic()
                act()
                return
            if at_step is None and "first_step_s" in out:
                return
            time.sleep(0.02)

    t = threading.Thread(target=go, daemon=True)
    t.start()
    return t


def _descendants(pid: int) -> list[int]:
    """Every process below pid (the agent -> torchrun -> its rank, which torchrun starts in a new session)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for k in kids:
            out += [k] + _descendants(k)
    return out


def _rendezvous_done(log: Path) -> float | None:
    """Wall time of node 0's "Rendezvous complete" line (glog prefix: I<MMDD> <HH:MM:SS.ffffff> <pid> …)."""
    import datetime as dt

    lines = log.read_text(errors="replace").splitlines()
    for i, ln in enumerate(lines):
        if "Rendezvous complete for workers" in ln:
            stamp = next(x for x in reversed(lines[: i + 1]) if x[:1] in "IWE" and x[1:5].isdigit())
            hms = stamp.split()[1]
            return dt.datetime.combine(dt.date.today(), dt.time.fromisoformat(hms)).timestamp()
    return None


def start(root: Path, base, data, nodes: int) -> dict:
    from models.training.launch import run_training

    root.mkdir(parents=True, exist_ok=True)
    wd = root / f"start-{nodes}"
    over = {"nnodes": 2, "nproc_per_node": 1, "rdzv_endpoint": "127.0.0.1"} if nodes == 2 else {"world_size": 2}
    spec = _spec(base, data, wd, **over)
    out: dict = {}
    os.environ["LOGLEVEL"] = "INFO"  # torchrun logs "Rendezvous complete" with a timestamp
    t0, wall0 = time.monotonic(), time.time()
    agent = _agent(wd, root / "node1-start.log", {}) if nodes == 2 else None
    watch = _first_step_watch(wd, t0, out)
    try:
        run_training(TARGET, spec, 2, wd)
    finally:
        os.environ.pop("LOGLEVEL")
    out["stage_s"] = time.monotonic() - t0
    watch.join(timeout=5)
    rdzv = _rendezvous_done(wd / "torchrun.log")
    if rdzv is not None:
        out["rendezvous_s"] = rdzv - wall0
        out["rendezvous_to_first_step_s"] = out["first_step_s"] - out["rendezvous_s"]
    if agent is not None:
        out["agent_exit"] = agent.wait(timeout=60)
    return out


def fail(root: Path, base, data, how: str) -> dict:
    from models.training.launch import MultiNodeError, run_training

    wd = root / f"{how}"
    env = {"DEEPSPEED_TIMEOUT": "1"} if how == "freeze" else {}
    os.environ.update(env)  # node 0's ranks inherit it
    spec = _spec(base, data, wd, nnodes=2, nproc_per_node=1, rdzv_endpoint="127.0.0.1", max_steps=400)
    out: dict = {}
    agent = _agent(wd, root / f"node1-{how}.log", env)
    pids = []

    def act():
        pids[:] = [agent.pid] + _descendants(agent.pid)
        if how == "kill":
            os.killpg(agent.pid, signal.SIGKILL)
        else:
            for p in pids:
                os.kill(p, signal.SIGSTOP)

    t0 = time.monotonic()
    _first_step_watch(wd, t0, out, at_step=3, act=act)
    try:
        run_training(TARGET, spec, 2, wd)
        out["error"] = None
    except MultiNodeError as e:
        out["error"] = str(e).splitlines()[0][:200]
        out["first_error"] = next((ln[:200] for ln in str(e).splitlines() if ln.startswith("first error")), None)
    out["fail_after_s"] = time.monotonic() - out["acted_at"]
    for p in pids:  # clean up a frozen node
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    agent.wait(timeout=30)
    for k in env:
        os.environ.pop(k, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=("start", "kill", "freeze"), action="append", default=None)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".posttrain" / "torch_extensions"))
    with tempfile.TemporaryDirectory(prefix="bench-multinode-") as tmp:
        root = Path(tmp)
        base, data = _setup(root)
        only = set(args.only or ("start", "kill", "freeze"))
        res: dict = {}
        for i in range(args.repeats if "start" in only else 0):
            for nodes in (2, 1):
                r = start(root / f"r{i}", base, data, nodes)
                res.setdefault(f"start_{'2x1' if nodes == 2 else '1x2'}", []).append(r)
                print(nodes, r, flush=True)
        for how in ("kill", "freeze"):
            if how in only:
                res[how] = fail(root, base, data, how)
                print(how, res[how], flush=True)
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
