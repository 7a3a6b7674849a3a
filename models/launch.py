"""Run a training function in this process (world_size 1) or on N ranks with torchrun.

A training function is named by "module:function" and takes (spec: dict, on_log) and returns a
JSON-able dict. With world_size > 1 every rank runs it; rank 0 writes `result.json` into the work
dir, and the parent follows `metrics.jsonl` so progress shows live. The same torchrun command extends
to several nodes with rendezvous arguments.

    python -m models.launch SPEC.json     # what each torchrun rank executes
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

from models.engine import free_port


def _resolve(target: str) -> Callable:
    mod, _, fn = target.partition(":")
    return getattr(importlib.import_module(mod), fn)


def run_training(
    target: str, spec: dict, world_size: int, workdir: str | os.PathLike,
    on_log: Callable[[dict], None] | None = None,
) -> dict:
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    if world_size == 1:
        return _resolve(target)(spec, on_log)
    spec_path = workdir / "spec.json"
    spec_path.write_text(json.dumps({"target": target, "spec": spec}))
    result_path = workdir / "result.json"
    result_path.unlink(missing_ok=True)
    threads = max(1, (os.cpu_count() or 1) // world_size)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world_size}",
        "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "models.launch", str(spec_path),
    ]
    log_path = workdir / "torchrun.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        seen = 0
        metrics_path = workdir / "metrics.jsonl"
        while True:
            rc = proc.poll()
            seen = _follow(metrics_path, seen, on_log)
            if rc is not None:
                break
            time.sleep(0.5)
    if rc != 0:
        tail = log_path.read_text(errors="replace")[-4000:]
        raise RuntimeError(f"torchrun with {world_size} ranks failed (exit {rc}); log {log_path}:\n{tail}")
    return json.loads(result_path.read_text())


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
