"""Distributed set-up for the training loop: a bare process made rank 0 of 1 (a process group on an
in-memory store, no TCP port), rendezvous ports outside the kernel's ephemeral range, stale
torch-extension build locks cleared, and the rank/world of this process."""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

import torch


def free_port() -> int:
    """A free TCP port for the rendezvous store, outside the kernel's ephemeral range.

    A port the kernel hands out for `bind(0)` is in the same range as the local ports of outgoing
    connections (Prefect's and MLflow's HTTP clients make many), so one can take it between our check
    and the store's bind (seen as EADDRINUSE). Ports below the ephemeral range are not handed out.
    """
    low, _ = _ephemeral_range()
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(max(1024, low - 12000), low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # everything below the range is taken: fall back to the kernel's pick
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999

def ensure_distributed_env(ops_cache: str | os.PathLike | None = None) -> None:
    """Make a bare process look like rank 0 of 1 (DeepSpeed otherwise looks for mpi4py)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if ops_cache is not None:
        # DeepSpeed JIT-compiles its shm_comm op at init (~25-40 s); cache it per machine/state dir.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ops_cache))
    clear_stale_op_locks(os.environ.get("TORCH_EXTENSIONS_DIR"))
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    if os.environ.get("WORLD_SIZE") == "1" and not torch.distributed.is_initialized():
        # One process needs no TCP store: a port picked here may be taken by another process before
        # DeepSpeed binds it (EADDRINUSE seen with runs started together). DeepSpeed adopts this group.
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo",
                                             store=torch.distributed.HashStore(), rank=0, world_size=1)

STALE_LOCK_SECONDS = 300  # compiling one op takes < 1 min here

def clear_stale_op_locks(ops_dir: str | None, max_age: float = STALE_LOCK_SECONDS) -> list[Path]:
    """Remove torch-extension build locks left by a process killed while compiling.

    torch's FileBaton waits forever on such a lock, so one SIGKILL during the first compile would
    hang every later run. A lock older than any real compile is stale.
    """
    if not ops_dir or not Path(ops_dir).is_dir():
        return []
    removed = []
    now = time.time()
    for lock in Path(ops_dir).glob("*/lock"):
        try:
            if now - lock.stat().st_mtime > max_age:
                lock.unlink()
                removed.append(lock)
        except FileNotFoundError:
            pass
    return removed

def rank_world() -> tuple[int, int]:
    """(RANK, WORLD_SIZE) of this process (0, 1 outside a launcher)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))

def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()
