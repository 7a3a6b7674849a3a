"""Processes that outlive the command that started them: who is still alive, and how to stop them.

`posttrain services up` starts servers in their own process groups and exits; a later `status` or
`down` finds them again by pid. A pid alone is not enough: a zombie (nothing may reap it in a
container whose init does not) still answers `kill -0`, and a pid can be reused, so a process is
identified by its pid and its start time, read from /proc (Linux).
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (state is [0], pgrp [2], start time [19])."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def start_ticks(pid: int) -> int | None:
    s = _stat(pid)
    return int(s[19]) if s else None


def alive(pid: int, ticks: int | None) -> bool:
    """The recorded process is still running: not gone, not a zombie, and not a new process that
    reused its pid (the start time differs)."""
    s = _stat(pid)
    if s is None:
        return False
    return s[0] != "Z" and (ticks is None or int(s[19]) == ticks)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of a process group: a server's workers are in its group."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            s = _stat(int(d.name))
            if s and s[0] != "Z" and int(s[2]) == pgid:
                out.append(int(d.name))
    return out


def stop_group(pgid: int, timeout: float = 20.0) -> None:
    """SIGTERM to the group, SIGKILL to what is left after `timeout` seconds."""
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while group_members(pgid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if not group_members(pgid):
            return


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_taken(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False
