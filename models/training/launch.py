"""Run a training function in this process (world_size 1), on N ranks with torchrun, or on several
machines that meet at a c10d rendezvous.

A training function is named by "module:function" and takes (spec: dict, on_log) and returns a
JSON-able dict. With world_size > 1 every rank runs it; rank 0 writes `result.json` into the work
dir, and the parent follows `metrics.jsonl` so progress shows live.

Several nodes (the stage config's `nnodes` > 1, docs/multinode.md): this process is node 0. It runs
`torchrun --nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT` hosting the rendezvous store,
writes `rendezvous.json` into the work dir (which every node must see at the same path) and prints
the command every other node runs, `posttrain node-agent`, which starts the same torchrun there. A node
that never arrives fails the stage after `rdzv_timeout_s`; a node that dies mid-stage fails it too
(torchrun --max-restarts 0), and rerunning the stage resumes from its last checkpoint.

    python -m models.training.launch SPEC.json     # what each torchrun rank executes
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from models.training.checkpoints import latest_checkpoint_step
from models.training.distributed import free_port
from models.recipes.train_config import parse_endpoint

RDZV_FILE = "rendezvous.json"  # node 0's announcement in the work dir: what `posttrain node-agent` joins


class MultiNodeError(RuntimeError):
    """A multi-node stage that could not start (a node never arrived) or lost a node."""


def _resolve(target: str) -> Callable:
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def run_training(
    target: str, spec: dict, world_size: int, workdir: str | os.PathLike,
    on_log: Callable[[dict], None] | None = None,
) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = spec.get("config") or {}
    nnodes = int(cfg.get("nnodes") or 1)
    if world_size == 1 and nnodes == 1:
        return _resolve(target)(spec, on_log)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps({"target": target, "spec": spec}))
    result_path = workdir / "result.json"
    result_path.unlink(missing_ok=True)
    rdzv = None
    if nnodes == 1:
        nproc = world_size
        launch = [f"--nproc_per_node={world_size}", "--master_addr=127.0.0.1", f"--master_port={free_port()}"]
    else:
        rdzv = announce_rendezvous(cfg, world_size, workdir, spec_path)
        nproc = rdzv["nproc_per_node"]
        launch = torchrun_rdzv_args(rdzv, host=True)
    cmd = [sys.executable, "-m", "torch.distributed.run", *launch, "-m", "models.training.launch", str(spec_path)]
    log_path = workdir / "torchrun.log"
    try:
        with open(log_path, "ab") as log:
            if rdzv is not None:
                log.write(f"[posttrain] node 0 of {nnodes}: {' '.join(cmd)}\n".encode())
                log.flush()
            proc = subprocess.Popen(cmd, env=_torchrun_env(nproc), stdout=log, stderr=subprocess.STDOUT,
                                    preexec_fn=_child_setup)
            seen = 0
            metrics_path = workdir / "metrics.jsonl"
            while True:
                rc = proc.poll()
                seen = _follow(metrics_path, seen, on_log)
                if rc is not None:
                    break
                time.sleep(0.5)
    finally:
        if rdzv is not None:  # an agent started later must not join a rendezvous that is over
            (workdir / RDZV_FILE).unlink(missing_ok=True)
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        if rdzv is not None:
            raise MultiNodeError(_multinode_failure(rdzv, rc, tail, log_path, workdir))
        raise RuntimeError(f"torchrun with {world_size} ranks failed (exit {rc}); log {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


def _torchrun_env(nproc: int) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


# ----------------------------------------------------------------------------- multi-node


def announce_rendezvous(cfg: dict, world_size: int, workdir: Path, spec_path: Path) -> dict:
    """Node 0's rendezvous: endpoint, id, layout and timeout, written atomically to the work dir's
    rendezvous.json (what `posttrain node-agent --workdir/--state-dir` reads) and printed with the
    exact agent command for the other nodes."""
    nnodes = int(cfg["nnodes"])
    nproc = int(cfg.get("nproc_per_node") or world_size // nnodes)
    if nnodes * nproc != world_size:
        raise MultiNodeError(f"world_size {world_size} != nnodes {nnodes} × nproc_per_node {nproc}")
    host, port = parse_endpoint(cfg["rdzv_endpoint"]) if cfg.get("rdzv_endpoint") else (socket.gethostname(), None)
    port = port or free_port()
    rdzv = {
        "endpoint": f"[{host}]:{port}" if ":" in host else f"{host}:{port}",
        "id": f"{workdir.name}-{secrets.token_hex(4)}",
        "nnodes": nnodes,
        "nproc_per_node": nproc,
        "timeout_s": float(cfg.get("rdzv_timeout_s") or 600),
        "spec": str(spec_path),
        "workdir": str(workdir),
        "torch_extensions_dir": os.environ.get("TORCH_EXTENSIONS_DIR"),
        "created": time.time(),
    }
    rdzv["agent_command"] = agent_command(rdzv)
    tmp = workdir / f"{RDZV_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(rdzv, indent=1))
    os.replace(tmp, workdir / RDZV_FILE)
    print(
        f"[posttrain] {workdir.name}: node 0 of {nnodes} waits up to {rdzv['timeout_s']:g}s at {rdzv['endpoint']} "
        f"for {nnodes - 1} more node(s); on each of them run:\n  {rdzv['agent_command']}\n"
        f"  (or `posttrain node-agent --workdir {workdir}`: the same, read from {RDZV_FILE})",
        file=sys.stderr, flush=True,
    )
    return rdzv


def agent_command(rdzv: dict) -> str:
    """The exact command that joins this rendezvous from another node."""
    return (
        f"posttrain node-agent --rdzv-endpoint {rdzv['endpoint']} --rdzv-id {rdzv['id']} "
        f"--nnodes {rdzv['nnodes']} --nproc-per-node {rdzv['nproc_per_node']} "
        f"--rdzv-timeout-s {rdzv['timeout_s']:g} --spec {rdzv['spec']}"
    )


def torchrun_rdzv_args(rdzv: dict, host: bool) -> list[str]:
    """torchrun's arguments for one node of the rendezvous. Node 0 hosts the c10d store (is_host
    explicit: on one machine or behind a Service name, guessing it from the hostname is wrong).
    --max-restarts 0: a node or rank that fails ends the stage (the flow's resume continues it from
    the last checkpoint) instead of the survivors waiting for a replacement."""
    t = int(max(1, round(rdzv["timeout_s"])))
    return [
        f"--nnodes={rdzv['nnodes']}", f"--nproc-per-node={rdzv['nproc_per_node']}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv['endpoint']}", f"--rdzv-id={rdzv['id']}",
        f"--rdzv-conf=join_timeout={t},last_call_timeout=1,close_timeout={t},is_host={int(host)}",
        "--max-restarts=0", "--monitor-interval=1",
    ]


def _multinode_failure(rdzv: dict, rc: int, tail: str, log_path: Path, workdir: Path) -> str:
    n = rdzv["nnodes"]
    if "RendezvousTimeoutError" in tail:
        return (
            f"multi-node stage {workdir.name}: not all {n} nodes joined the rendezvous at {rdzv['endpoint']} "
            f"(id {rdzv['id']}) within rdzv_timeout_s={rdzv['timeout_s']:g}s. Start one agent on each of the "
            f"other {n - 1} node(s) while node 0 waits:\n  {rdzv['agent_command']}\nlog {log_path}"
        )
    step = latest_checkpoint_step(workdir / "checkpoints")
    where = f"its last checkpoint (step {step})" if step is not None else "step 0 (no checkpoint yet)"
    causes = [ln for ln in log_path.read_text(errors="replace").splitlines()
              if re.match(r"\[rank\d+\]: [\w.]*(Error|Exception)\b", ln)]
    cause = f"\nfirst error: {causes[0][:600]}" if causes else ""
    return (
        f"multi-node stage {workdir.name} on {n} nodes failed (torchrun on node 0 exited {rc}): a rank failed "
        f"or a node left the rendezvous {rdzv['id']}. Rerunning the stage (`posttrain resume`) continues from "
        f"{where} once every node's agent has joined again.{cause}\nLog {log_path}:\n{tail[-2500:]}"
    )


def find_rendezvous(workdir: str | os.PathLike | None = None, state_dir: str | os.PathLike | None = None,
                    stage: str | None = None, wait_s: float = 0.0, exclude: frozenset | set = frozenset()) -> dict:
    """The rendezvous node 0 announced: in `workdir`, or the newest one under `state_dir`/work (of a
    stage named `stage`, if given), leaving out the ids in `exclude` (those already joined). Waits up
    to wait_s for one to appear."""
    if workdir is not None:
        candidates = lambda: [Path(workdir) / RDZV_FILE]  # noqa: E731
    elif state_dir is not None:
        pattern = f"{stage}-*/{RDZV_FILE}" if stage else f"*/{RDZV_FILE}"
        candidates = lambda: list((Path(state_dir) / "work").glob(pattern))  # noqa: E731
    else:
        raise ValueError("give a work dir or a state dir")
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for p in candidates():
            try:
                r = json.loads(p.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if r.get("id") not in exclude:
                found.append(r)
        if found:
            return max(found, key=lambda r: r.get("created", 0))
        if time.monotonic() >= deadline:
            where = workdir if workdir is not None else f"{state_dir}/work/{stage or '*'}-*"
            raise MultiNodeError(f"no rendezvous announced in {where} within {wait_s:g}s (node 0 writes {RDZV_FILE} "
                                 "when a multi-node stage starts)")
        time.sleep(0.5)


def run_node_agent(rdzv: dict, log=None) -> int:
    """One other node of a multi-node stage: torchrun joining node 0's rendezvous, in the foreground.
    Returns torchrun's exit status (non-zero when the stage failed or a node never arrived)."""
    if rdzv.get("torch_extensions_dir"):
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", rdzv["torch_extensions_dir"])
    cmd = [sys.executable, "-m", "torch.distributed.run", *torchrun_rdzv_args(rdzv, host=False),
           "-m", "models.training.launch", rdzv["spec"]]
    print(f"[posttrain] node agent: joining {rdzv['id']} at {rdzv['endpoint']} ({rdzv['nnodes']} nodes × "
          f"{rdzv['nproc_per_node']} ranks, join timeout {rdzv['timeout_s']:g}s)", file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=_torchrun_env(int(rdzv["nproc_per_node"])), stdout=log, stderr=log,
                            preexec_fn=_child_setup)
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        rc = proc.wait()
    if rc != 0:
        print(f"[posttrain] node agent: torchrun exited {rc} (rendezvous {rdzv['id']}: a node never arrived, "
              "a rank failed or a node left; see above)", file=sys.stderr, flush=True)
    return rc


def _follow(path: Path, seen: int, on_log) -> int:
    if on_log is None or not path.exists():
        return seen
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    for ln in lines[seen:]:
        try:
            on_log(json.loads(ln))
        except json.JSONDecodeError:
            return seen  # a line being written; read it next time
        seen += 1
    return seen


def _child_setup() -> None:
    """torchrun's preexec: it dies with the flow process and gets the default signal mask back
    (the CLI blocks SIGINT/SIGTERM in its own threads, flows/interrupt.py; a mask is inherited)."""
    _die_with_parent()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, (signal.SIGINT, signal.SIGTERM))


def _die_with_parent() -> None:
    """Children die with the flow process (a SIGKILLed run must not leave ranks training)."""
    try:
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def main() -> None:
    payload = json.loads(Path(sys.argv[1]).read_text())
    _die_with_parent()
    result = _resolve(payload["target"])(payload["spec"], None)
    if int(os.environ.get("RANK", 0)) == 0:
        out = Path(sys.argv[1]).with_name("result.json")
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        os.replace(tmp, out)
    _exit_after_peers()


def _exit_after_peers() -> None:
    """Leave once every rank is done, skipping C++ static destructors.

    About one 2-rank run in ten aborted at interpreter exit ("terminate called without an active
    exception": a native worker thread still joinable when its owner is destroyed) after the work was
    written, and torchrun then reported the stage failed. Every file is closed by now, so once all
    ranks have passed the barrier nothing is left that those destructors could finish.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
