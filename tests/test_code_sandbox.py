"""The code sandbox: right/wrong code, and hostile code that must score 0 and harm nothing."""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid

import pytest

from models.rewards import code_sandbox
from models.rewards.code_sandbox import code_reward, extract_code, run_sandboxed

ADD_TESTS = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
SLACK_S = 2.0  # process start + namespace teardown, measured ~0.1 s here


@pytest.fixture(scope="module")
def isolation():
    iso = code_sandbox.probe_isolation()
    assert iso is not None, "no sandbox configuration could run Python on this machine"
    return iso


def _score(code: str, reference: str = "") -> float | None:
    return code_reward("", f"```python\n{code}\n```", reference)


def _sandbox_processes() -> list[int]:
    """Host processes running as any sandbox uid."""
    low = code_sandbox.SANDBOX_UID_BASE
    high = low + code_sandbox.SANDBOX_UID_SLOTS
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status") as fh:
                for line in fh:
                    if line.startswith("Uid:"):
                        if low <= int(line.split()[1]) < high:
                            pids.append(int(entry))
                        break
        except OSError:
            continue
    return pids


def _wait_until(predicate, deadline_s: float = 5.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# --- ordinary code -------------------------------------------------------------------------------


def test_correct_code_scores_one(isolation):
    completion = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"
    assert code_reward("", completion, ADD_TESTS) == 1.0


def test_failing_assert_scores_zero(isolation):
    assert _score("def add(a, b):\n    return a - b", ADD_TESTS) == 0.0


def test_syntax_error_scores_zero(isolation):
    assert _score("def add(a, b) return a + b", ADD_TESTS) == 0.0


def test_last_python_block_is_used_and_whole_completion_without_fence():
    text = "```python\nx = 1\n```\nthen\n```py\nx = 2\n```\n```text\nnot code\n```"
    assert extract_code(text) == "x = 2\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
    assert extract_code("```python\nunterminated = 1\n") == "unterminated = 1\n"


def test_unfenced_completion_runs_whole(isolation):
    assert code_reward("", "def add(a, b):\n    return a + b\n", ADD_TESTS) == 1.0


def test_output_is_bounded(isolation):
    result = run_sandboxed("import sys\nsys.stdout.write('x' * 10_000_000)")
    assert result.returncode == 0
    assert len(result.stdout) == code_sandbox.OUTPUT_LIMIT


def test_result_names_its_isolation(isolation):
    result = run_sandboxed("print('hello')")
    assert result.stdout == "hello\n" and result.isolation == isolation.describe()


def test_weird_model_output_never_raises(isolation):
    for completion in ["", "\x00\x00", "```python\n\ud800\n```", "```py\n" + "(" * 100_000]:
        assert code_reward("", completion, "") in (0.0, 1.0)


# --- hostile code --------------------------------------------------------------------------------


def test_infinite_loop_is_cut_at_the_timeout(isolation):
    start = time.monotonic()
    result = run_sandboxed("while True:\n    pass", timeout_s=1.0)
    elapsed = time.monotonic() - start
    assert result.timed_out and not result.passed
    assert elapsed < 1.0 + SLACK_S, elapsed


def test_infinite_loop_reward_is_zero(isolation):
    start = time.monotonic()
    assert _score("while True:\n    pass") == 0.0
    assert time.monotonic() - start < 5.0 + SLACK_S


def test_fork_bomb_is_contained_and_leaves_nothing(isolation):
    if not isolation.drop_uid and not isolation.user_namespace:
        pytest.skip(f"RLIMIT_NPROC is not enforced for root ({isolation.describe()})")
    before = len(os.listdir("/proc"))
    start = time.monotonic()
    assert _score("import os\nwhile True:\n    os.fork()") == 0.0
    assert time.monotonic() - start < 5.0 + SLACK_S
    if isolation.drop_uid:
        assert _wait_until(lambda: not _sandbox_processes()), _sandbox_processes()
    assert _wait_until(lambda: len(os.listdir("/proc")) <= before + 2)


def test_fork_bomb_that_escapes_the_process_group_is_still_reaped(isolation):
    if not isolation.unshare:
        pytest.skip(f"needs a PID namespace ({isolation.describe()})")
    # children in their own session are out of reach of killpg; the PID namespace still ends them
    code = (
        "import os, time\n"
        "if os.fork() == 0:\n    os.setsid()\n    for _ in range(3):\n        os.fork()\n"
        "time.sleep(60)"
    )
    assert run_sandboxed(code, timeout_s=1.0).timed_out
    if isolation.drop_uid:
        assert _wait_until(lambda: not _sandbox_processes()), _sandbox_processes()


def test_huge_allocation_scores_zero(isolation):
    assert _score("x = bytearray(10**10)") == 0.0


def test_no_network_even_to_loopback(isolation):
    if not isolation.unshare:
        pytest.skip(f"needs a network namespace ({isolation.describe()})")
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    port = listener.getsockname()[1]
    try:
        code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)"
        assert _score(code) == 0.0
        listener.setblocking(False)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected
    finally:
        listener.close()


def test_writes_outside_its_dir_do_not_land(isolation, tmp_path):
    tag = uuid.uuid4().hex
    targets = [tmp_path / "pwned", f"/tmp/pwned-{tag}", f"/var/tmp/pwned-{tag}"]
    if not isolation.unshare:
        targets = targets[:1]  # world-writable /tmp is only private with a mount namespace
    try:
        for target in targets:
            _score(f"open({str(target)!r}, 'w').write('pwned')")
            assert not os.path.exists(target), target
        assert _score(f"open({str(tmp_path / 'pwned')!r}, 'w').write('pwned')") == 0.0
    finally:
        for target in targets:
            if os.path.exists(target):
                os.unlink(target)


def test_parent_environment_is_not_visible(isolation, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_SECRET", "hunter2")
    assert _score("import os\nassert os.environ['POSTTRAIN_SECRET'] == 'hunter2'") == 0.0
    result = run_sandboxed("import os\nprint(sorted(os.environ))")
    assert "POSTTRAIN_SECRET" not in result.stdout


def test_cannot_kill_its_parent_or_the_test(isolation):
    if not isolation.unshare and not isolation.drop_uid:
        pytest.skip(f"a root child without namespaces could kill us ({isolation.describe()})")
    me = os.getpid()
    for code in [
        "import os\nos.kill(os.getppid(), 9)",
        f"import os\nos.kill({me}, 9)",
        "import os\nos.kill(-1, 9)",
        f"import os\nos.killpg(os.getpgid({me}), 9)",
    ]:
        assert _score(code) == 0.0, code
    assert os.getpid() == me  # still here


# --- degraded modes ------------------------------------------------------------------------------


def test_missing_namespaces_are_reported_loudly(monkeypatch, caplog):
    real_which = code_sandbox.shutil.which
    monkeypatch.setattr(
        code_sandbox.shutil, "which", lambda name, *a: None if name == "unshare" else real_which(name)
    )
    code_sandbox.probe_isolation.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=code_sandbox.__name__):
            iso = code_sandbox.probe_isolation()
        assert iso is not None and iso.unshare is None
        assert "namespaces" in caplog.text and "degraded" in caplog.text
        start = time.monotonic()
        result = run_sandboxed("while True:\n    pass", timeout_s=1.0)
        assert result.timed_out and time.monotonic() - start < 1.0 + SLACK_S
        assert run_sandboxed("print(2 + 2)").stdout == "4\n"
    finally:
        code_sandbox.probe_isolation.cache_clear()


def test_every_configuration_the_probe_may_pick_runs_python():
    for config in code_sandbox._configurations():
        for interpreter in code_sandbox._interpreter_candidates():
            iso = code_sandbox.Isolation(**{**config.__dict__, "interpreter": interpreter})
            result = code_sandbox._execute(iso, "print('ok')", 5.0, code_sandbox._Limits())
            if result.passed:
                assert result.stdout == "ok\n"
                break
        else:
            pytest.fail(f"no interpreter runs under {config.describe()}")


def test_concurrent_fork_bombs_do_not_fail_innocent_runs(isolation):
    if not isolation.drop_uid:
        pytest.skip(f"per-run uids need root ({isolation.describe()})")
    from concurrent.futures import ThreadPoolExecutor

    good = "```python\ndef add(a, b):\n    return a + b\n```"
    bomb = "```python\nimport os\nwhile True:\n    os.fork()\n```"
    with ThreadPoolExecutor(max_workers=8) as pool:
        scores = list(pool.map(lambda c: code_reward("", c, ADD_TESTS), [good, bomb] * 8))
    assert scores == [1.0, 0.0] * 8
