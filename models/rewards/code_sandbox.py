"""Run untrusted, model-written Python in a sandboxed child process; the ``code`` reward on top.

Model output is hostile until proven otherwise. rlimits alone are not a sandbox (the child could
still write to ``/tmp``, reach services on loopback, signal its parent, and for root
``RLIMIT_NPROC`` is not enforced), so where Linux allows it the child gets, in order of strength:

1. namespaces via util-linux ``unshare``: ``--net`` (only a loopback that is down: no network),
   ``--pid`` + ``--mount-proc`` (cannot see or signal host processes; everything dies with it),
   ``--ipc``, ``--uts``, a mount namespace with fresh tmpfs over every world-writable directory
   (``/tmp``, ``/var/tmp``, ``/dev/shm``, …), so nothing it writes survives; ``--kill-child``
   so the namespace dies when the launcher is killed;
2. an unprivileged uid of its own (``SANDBOX_UID_BASE`` + a free slot) via ``setpriv`` with
   ``no_new_privs`` when we are root:
   then ``RLIMIT_NPROC`` is enforced and root-owned files are read-only to it; when we are not
   root, a user namespace (``--user --map-root-user``) stands in;
3. always: rlimits (CPU, address space, file size, processes, open files, no core dumps), an
   empty temp dir as cwd and HOME, an environment of only PATH/HOME/LANG, ``python -I -S``
   (isolated, no site), a new session, a hard wall-clock timeout that SIGKILLs the whole process
   group, and at most ``OUTPUT_LIMIT`` bytes of stdout/stderr kept.

Which of 1–2 work is probed once per process (``probe_isolation``); anything missing is logged as
a WARNING naming it, and every ``SandboxResult`` says in ``isolation`` what it actually ran under.
bubblewrap is not used: it is not installed everywhere, and ``unshare`` + ``setpriv`` (same
util-linux package) cover the same ground here.

Not covered: CPU/memory cgroups (RLIMIT_AS bounds each process, not the sum over its children)
and reads of world-readable host files.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import logging
import os
import random
import re
import resource
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from models.rewards import register_reward

logger = logging.getLogger(__name__)

# Each concurrent run gets its own unprivileged uid (and gid) from this range, held with a flock
# so that other processes on the host pick others: RLIMIT_NPROC counts per uid, so with one shared
# uid a fork bomb in one run would make concurrent, innocent runs fail to start.
SANDBOX_UID_BASE = 1_500_000_000
SANDBOX_UID_SLOTS = 256
OUTPUT_LIMIT = 64 * 1024
_SETUP_FAILED = "posttrain-sandbox: setup failed"
_SETUP_FAILED_RC = 125
_MAIN = "main.py"
_NS_WORKDIR = "/tmp/sandbox"
_PRIVATE_DIR_CANDIDATES = ("/tmp", "/var/tmp", "/dev/shm", "/run/lock", "/var/lock", "/run/shm")


@dataclass(frozen=True)
class SandboxResult:
    """What came back from one sandboxed run.

    ``returncode`` is None when the sandbox itself could not start (or its setup failed);
    negative values are the signal that killed the child. ``stdout``/``stderr`` are truncated to
    ``OUTPUT_LIMIT`` bytes each. ``isolation`` names the mechanisms it ran under.
    """

    returncode: int | None
    timed_out: bool
    stdout: str
    stderr: str
    isolation: str

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and not self.timed_out


@dataclass(frozen=True)
class Isolation:
    """The sandbox configuration that the probe found working on this machine."""

    unshare: str | None  # path of util-linux unshare when namespaces work
    user_namespace: bool  # not root: --user --map-root-user instead of dropping uid
    setpriv: str | None  # path of setpriv when we drop to a sandbox uid inside the namespace
    drop_uid: bool  # the child runs as a sandbox uid (via setpriv, or Popen(user=) without ns)
    interpreter: str
    private_dirs: tuple[str, ...]
    missing: tuple[str, ...]

    def describe(self) -> str:
        parts = []
        if self.unshare:
            parts.append("namespaces(net,pid,ipc,uts,mount)")
            parts.append(f"private-tmpfs({','.join(self.private_dirs)})")
        if self.user_namespace:
            parts.append("user-namespace")
        if self.drop_uid:
            parts.append(f"uid={SANDBOX_UID_BASE}+slot")
        if self.setpriv:
            parts.append("no-new-privs")
        parts.append("rlimits")
        return "+".join(parts)


def _world_writable_dirs() -> tuple[str, ...]:
    found: list[str] = []
    for path in _PRIVATE_DIR_CANDIDATES:
        real = os.path.realpath(path)
        try:
            mode = os.stat(real).st_mode
        except OSError:
            continue
        if stat.S_ISDIR(mode) and (mode & stat.S_IWOTH or real == "/tmp") and real not in found:
            found.append(real)
    if "/tmp" not in found:
        found.insert(0, "/tmp")  # the namespace's workdir lives on the /tmp tmpfs
    return tuple(found)


def _interpreter_candidates() -> list[str]:
    seen: list[str] = []
    for path in (os.path.realpath(sys.executable), "/usr/bin/python3", "/usr/local/bin/python3"):
        if path and os.path.exists(path) and path not in seen:
            seen.append(path)
    return seen


def _configurations() -> list[Isolation]:
    """Every configuration worth trying, strongest first (interpreter left blank)."""
    root = os.geteuid() == 0
    unshare = shutil.which("unshare")
    setpriv = shutil.which("setpriv")
    dirs = _world_writable_dirs()
    configs = []
    if unshare and root and setpriv:
        configs.append(Isolation(unshare, False, setpriv, True, "", dirs, ()))
    if unshare and root:
        missing = ("setpriv (child stays root: RLIMIT_NPROC unenforced)",)
        configs.append(Isolation(unshare, False, None, False, "", dirs, missing))
    if unshare and not root:
        missing = (f"root (child runs as uid {os.getuid()} in a user namespace)",)
        configs.append(Isolation(unshare, True, None, False, "", dirs, missing))
    if root:
        configs.append(Isolation(None, False, None, True, "", (), ("namespaces",)))
    missing = ("namespaces", "uid drop (RLIMIT_NPROC unenforced for root)" if root else "uid drop")
    configs.append(Isolation(None, False, None, False, "", (), missing))
    return configs


# The interpreter must be fully readable by the sandbox uid: a binary exec'd from a directory it
# cannot read (pyenv under a 0700 /root) starts, but silently mixes in another stdlib.
_PROBE_PROGRAM = (
    "import json, os, sys\nos.stat(sys.executable)\nos.listdir(sys.prefix)\nprint('sandbox-ok')\n"
)


@functools.lru_cache(maxsize=1)
def probe_isolation() -> Isolation | None:
    """The strongest configuration that runs a trivial program here (cached); None if none does."""
    for config in _configurations():
        for interpreter in _interpreter_candidates():
            candidate = Isolation(**{**config.__dict__, "interpreter": interpreter})
            result = _execute(candidate, _PROBE_PROGRAM, 10.0, _Limits())
            if result.passed and result.stdout.strip() == "sandbox-ok":
                if candidate.missing:
                    logger.warning(
                        "code sandbox degraded: missing %s; running with %s",
                        ", ".join(candidate.missing),
                        candidate.describe(),
                    )
                else:
                    logger.info("code sandbox: %s via %s", candidate.describe(), interpreter)
                return candidate
            logger.debug("sandbox probe %s failed: %s", candidate.describe(), result.stderr[-500:])
    logger.error("code sandbox: no configuration could run Python; code rewards will be None")
    return None


@dataclass(frozen=True)
class _Limits:
    cpu_s: int = 6
    memory_mb: int = 1024
    file_mb: int = 10
    processes: int = 64
    open_files: int = 64

    def rlimits(self) -> list[tuple[int, int]]:
        wanted = [
            (resource.RLIMIT_CPU, self.cpu_s),
            (resource.RLIMIT_AS, self.memory_mb * 1024 * 1024),
            (resource.RLIMIT_FSIZE, self.file_mb * 1024 * 1024),
            (resource.RLIMIT_NPROC, self.processes),
            (resource.RLIMIT_NOFILE, self.open_files),
            (resource.RLIMIT_CORE, 0),
        ]
        out = []
        for which, value in wanted:  # never ask for more than the current hard limit allows
            hard = resource.getrlimit(which)[1]
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            out.append((which, value))
        return out


def _apply_rlimits(limits: list[tuple[int, int]]) -> None:
    # Runs in the forked child before exec: keep it to plain setrlimit calls.
    for which, value in limits:
        resource.setrlimit(which, (value, value))


def _namespace_command(iso: Isolation, uid: int | None) -> list[str]:
    """unshare … sh -c '<mount private tmpfs, make workdir, copy program from stdin, exec>'."""
    flags = ["--net", "--pid", "--ipc", "--uts", "--fork", "--mount-proc", "--kill-child"]
    if iso.user_namespace:
        flags = ["--user", "--map-root-user", *flags]
    q = shlex.quote
    run = [iso.interpreter, "-I", "-S", _MAIN]
    if iso.setpriv:
        run = [iso.setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
               "--no-new-privs", "--", *run]  # fmt: skip
    lines = ["fail() { echo \"$1\" >&2; exit %d; }" % _SETUP_FAILED_RC]
    for d in iso.private_dirs:
        opts = "size=32m,nr_inodes=4096,mode=1777,nosuid,nodev"
        lines.append(f"mount -t tmpfs -o {opts} tmpfs {q(d)} || fail {q(_SETUP_FAILED + ' ' + d)}")
    lines.append(f"mkdir -m 700 {_NS_WORKDIR} || fail {q(_SETUP_FAILED)}")
    if iso.setpriv:
        lines.append(f"chown {uid}:{uid} {_NS_WORKDIR} || fail {q(_SETUP_FAILED)}")
    lines.append(f"cd {_NS_WORKDIR} && cat > {_MAIN} || fail {q(_SETUP_FAILED)}")
    lines.append("exec </dev/null")
    # Not exec: the shell stays PID 1 of the namespace (root-owned, unkillable by the child), so
    # the program gets ordinary signal semantics and its getppid() is something it cannot kill.
    lines.append(" ".join(q(a) for a in run))
    lines.append("exit $?")
    return [iso.unshare, *flags, "/bin/sh", "-c", "\n".join(lines)]


def _drain(stream, sink: bytearray, limit: int) -> None:
    """Read ``stream`` to EOF, keeping its first ``limit`` bytes (draining: the child never blocks)."""
    try:
        while chunk := stream.read1(65536):
            if len(sink) < limit:
                sink.extend(chunk[: limit - len(sink)])
    except (OSError, ValueError):
        pass


@contextlib.contextmanager
def _sandbox_uid(needed: bool):
    """Hold a sandbox uid that no other live run on this host holds (None if not ``needed``)."""
    if not needed:
        yield None
        return
    lock_dir = os.path.join(tempfile.gettempdir(), f"posttrain-sandbox-uids-{os.geteuid()}")
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    info = os.lstat(lock_dir)
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.geteuid():
        raise RuntimeError(f"{lock_dir} is not a directory owned by us; refusing to use it")
    start = random.randrange(SANDBOX_UID_SLOTS)
    for i in range(SANDBOX_UID_SLOTS):
        slot = (start + i) % SANDBOX_UID_SLOTS
        flags = os.O_CREAT | os.O_RDWR | os.O_CLOEXEC
        fd = os.open(os.path.join(lock_dir, str(slot)), flags, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            continue
        try:
            yield SANDBOX_UID_BASE + slot
        finally:
            os.close(fd)  # releases the flock
        return
    raise RuntimeError(f"all {SANDBOX_UID_SLOTS} sandbox uids are busy")


def _execute(iso: Isolation, code: str, timeout_s: float, limits: _Limits) -> SandboxResult:
    """Write the program to a private host temp dir, then run it under ``iso``."""
    with _sandbox_uid(iso.drop_uid) as uid, tempfile.TemporaryDirectory(
        prefix="posttrain-sandbox-"
    ) as host_dir:
        path = os.path.join(host_dir, _MAIN)
        with open(path, "wb") as fh:
            fh.write(code.encode("utf-8", errors="replace"))
        extra: dict = {}
        if iso.unshare:  # the shell copies the program from stdin into the namespace's tmpfs
            argv, cwd, home = _namespace_command(iso, uid), "/", _NS_WORKDIR
        else:
            argv, cwd, home = [iso.interpreter, "-I", "-S", _MAIN], host_dir, host_dir
            if iso.drop_uid:
                os.chown(host_dir, uid, uid)
                extra = {"user": uid, "group": uid, "extra_groups": []}
        env = {"PATH": "/usr/bin:/bin", "HOME": home, "LANG": "C.UTF-8"}
        with open(path if iso.unshare else os.devnull, "rb") as stdin:
            return _run(argv, cwd, env, stdin, extra, timeout_s, limits, iso)


def _run(argv, cwd, env, stdin, extra, timeout_s, limits: _Limits, iso: Isolation) -> SandboxResult:
    describe = iso.describe()
    rlimits = limits.rlimits()
    try:
        proc = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            preexec_fn=functools.partial(_apply_rlimits, rlimits), start_new_session=True,
            close_fds=True, **extra,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError) as exc:
        logger.error("code sandbox could not start: %s", exc)
        return SandboxResult(None, False, "", f"sandbox could not start: {exc}", describe)
    out, err = bytearray(), bytearray()
    readers = [
        threading.Thread(target=_drain, args=(proc.stdout, out, OUTPUT_LIMIT), daemon=True),
        threading.Thread(target=_drain, args=(proc.stderr, err, OUTPUT_LIMIT), daemon=True),
    ]
    for reader in readers:
        reader.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    # Always kill the group: without a PID namespace, children may outlive the main process.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 2.0
    for reader in readers:  # a grandchild that left our group could hold a pipe open: don't hang
        reader.join(max(0.0, deadline - time.monotonic()))
    for pipe in (proc.stdout, proc.stderr):
        pipe.close()
    stdout = out.decode("utf-8", errors="replace")
    stderr = err.decode("utf-8", errors="replace")
    returncode: int | None = proc.returncode
    if returncode == _SETUP_FAILED_RC and stderr.startswith(_SETUP_FAILED):
        logger.error("code sandbox setup failed: %s", stderr.strip()[:500])
        returncode = None
    return SandboxResult(returncode, timed_out, stdout, stderr, describe)


def run_sandboxed(
    code: str,
    timeout_s: float = 5.0,
    memory_mb: int = 1024,
    *,
    file_mb: int = 10,
    max_processes: int = 64,
    max_open_files: int = 64,
) -> SandboxResult:
    """Run ``code`` as a Python script in the sandbox; never raises on what ``code`` contains.

    ``timeout_s`` is wall-clock (the CPU limit is that rounded up, plus one second);
    ``memory_mb`` is the address-space limit per process. ``max_processes`` counts every process
    of the sandbox uid on the host, so it is only a per-run bound when runs do not overlap.
    """
    iso = probe_isolation()
    if iso is None:
        return SandboxResult(None, False, "", "no working sandbox on this machine", "none")
    limits = _Limits(
        cpu_s=int(timeout_s) + 2, memory_mb=memory_mb, file_mb=file_mb,
        processes=max_processes, open_files=max_open_files,
    )  # fmt: skip
    try:
        return _execute(iso, code, timeout_s, limits)
    except Exception as exc:  # our own failure, not the model's: not judged
        logger.exception("code sandbox failed")
        return SandboxResult(None, False, "", f"sandbox error: {exc}", iso.describe())


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(completion: str) -> str:
    """The last fenced ```python / ```py block of ``completion``, or all of it if there is none."""
    blocks = _FENCE.findall(completion)
    return blocks[-1] if blocks else completion


@register_reward("code")
def code_reward(prompt: str, completion: str, reference: str) -> float | None:
    """1.0 if the extracted code followed by ``reference`` (asserts) exits 0 in time, else 0.0.

    None only when the sandbox itself could not start.
    """
    if not isinstance(completion, str) or not isinstance(reference, str):
        return None
    program = f"{extract_code(completion)}\n\n{reference}\n"
    result = run_sandboxed(program)
    if result.returncode is None and not result.timed_out:
        return None
    return 1.0 if result.passed else 0.0
