"""Reward registry, combination, and the format / math / builtin_task rewards."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

import models.rewards as rewards
from models.rewards import combine_rewards, get_reward, register_reward

# --- registry ------------------------------------------------------------------------------------


def test_known_names_and_lookup():
    assert {"math", "format", "code", "builtin_task"} <= set(rewards.REWARD_NAMES)
    for name in ("math", "format", "code", "builtin_task"):
        assert callable(get_reward(name))


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        get_reward("nope")
    assert "nope" in str(info.value) and "math" in str(info.value) and "format" in str(info.value)


def test_registering_a_reward_makes_it_known():
    @register_reward("test_constant_half")
    def half(prompt, completion, reference):
        return 0.5

    assert get_reward("test_constant_half") is half
    assert "test_constant_half" in rewards.REWARD_NAMES


def test_importing_the_package_does_not_import_math_verify():
    code = "import sys, models.rewards; assert 'math_verify' not in sys.modules; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


# --- combine_rewards -----------------------------------------------------------------------------


@pytest.fixture
def fixed_rewards():
    register_reward("test_one")(lambda p, c, r: 1.0)
    register_reward("test_none")(lambda p, c, r: None)
    register_reward("test_quarter")(lambda p, c, r: 0.25)

    def boom(p, c, r):
        raise RuntimeError("reward bug")

    register_reward("test_raises")(boom)


def test_combined_total_is_the_weighted_sum(fixed_rewards):
    total, parts = combine_rewards({"test_one": 2.0, "test_quarter": 4.0})("p", "c", "r")
    assert total == pytest.approx(3.0)  # 2 * 1.0 + 4 * 0.25 = 3.0
    assert parts == {"test_one": 1.0, "test_quarter": 0.25}


def test_none_parts_count_as_zero_but_stay_none(fixed_rewards):
    total, parts = combine_rewards({"test_one": 0.5, "test_none": 10.0})("p", "c", "r")
    assert total == pytest.approx(0.5)  # 0.5 * 1.0 + 10 * (None -> 0) = 0.5
    assert parts == {"test_one": 1.0, "test_none": None}


def test_all_none_gives_none_total_and_raising_reward_is_none(fixed_rewards):
    total, parts = combine_rewards({"test_none": 1.0, "test_raises": 1.0})("p", "c", "r")
    assert total is None and parts == {"test_none": None, "test_raises": None}


def test_combine_rejects_unknown_names_up_front():
    with pytest.raises(ValueError):
        combine_rewards({"format": 1.0, "not_a_reward": 1.0})


def test_combine_real_rewards():
    combined = combine_rewards({"format": 0.1, "math": 1.0})
    total, parts = combined("", "<think>half</think><answer>\\frac{1}{2}</answer>", "0.5")
    assert parts == {"format": 1.0, "math": 1.0} and total == pytest.approx(1.1)


# --- format --------------------------------------------------------------------------------------

fmt = get_reward("format")


@pytest.mark.parametrize(
    "completion",
    [
        "<think>2+2 is 4</think><answer>4</answer>",
        "  <think>\nline one\nline two\n</think>\n\n<answer> 4 </answer>\n",
        "<think></think><answer>4</answer>",
    ],
)
def test_format_accepts(completion):
    assert fmt("", completion, "") == 1.0


@pytest.mark.parametrize(
    "completion",
    [
        "<answer>4</answer>",  # missing think
        "<think>x</think>",  # missing answer
        "<think>x</think><answer>4</answer> and more",  # text after answer
        "<think>x</think><answer>4</answer><answer>5</answer>",  # two answers
        "<think>x</think><think>y</think><answer>4</answer>",  # two thinks
        "<think>x</think><answer>  \n </answer>",  # empty answer
        "<think>x</think><answer></answer>",  # empty answer
        "preamble <think>x</think><answer>4</answer>",  # text before think
        "<answer>4</answer><think>x</think>",  # wrong order
        "<think>x<answer>4</answer></think>",  # nested
        "",
    ],
)
def test_format_rejects(completion):
    assert fmt("", completion, "") == 0.0


# --- math ----------------------------------------------------------------------------------------

math_reward = get_reward("math")


@pytest.mark.parametrize(
    ("completion", "reference", "expected"),
    [
        ("<think>half</think><answer>0.5</answer>", "\\frac{1}{2}", 1.0),
        ("The answer is \\boxed{3}.", "2", 0.0),
        ("<answer>2</answer>", "2", 1.0),
        ("<answer>(x+1)^2</answer>", "x^2+2x+1", 1.0),
        ("first \\boxed{1}, finally \\boxed{\\frac{3}{4}}", "0.75", 1.0),
        ("no tags, just 42", "42", 1.0),
        ("", "2", 0.0),
        ("<answer>@@@ not math</answer>", "2", 0.0),
    ],
)
def test_math_cases(completion, reference, expected):
    assert math_reward("", completion, reference) == expected


def test_answer_tag_is_preferred_over_boxed():
    from models.rewards.math import extract_answer

    assert extract_answer("\\boxed{1} <answer>2</answer>") == "2"
    assert extract_answer("x \\boxed{\\frac{1}{2}} y") == "\\boxed{\\frac{1}{2}}"
    assert extract_answer("  7 ") == "7"


def test_unparseable_reference_is_none():
    assert math_reward("", "<answer>1</answer>", "@@@") is None
    assert math_reward("", "<answer>1</answer>", "") is None


def test_math_works_off_the_main_thread():
    results = []
    thread = threading.Thread(
        target=lambda: results.append(math_reward("", "<answer>0.5</answer>", "\\frac{1}{2}"))
    )
    thread.start()
    thread.join(30)
    with ThreadPoolExecutor(max_workers=2) as pool:
        pooled = list(pool.map(lambda c: math_reward("", c, "2"), ["\\boxed{2}", "\\boxed{3}"]))
    assert results == [1.0] and pooled == [1.0, 0.0]


def test_math_timeout_gives_none_within_the_limit(monkeypatch):
    import math_verify

    from models.rewards import math as math_module

    release = threading.Event()

    def stuck_verify(*args, **kwargs):
        release.wait(30)  # stands in for a sympy simplification that never ends
        return True

    monkeypatch.setattr(math_verify, "verify", stuck_verify)
    start = time.monotonic()
    try:
        assert math_module.verify_math_answer("<answer>1</answer>", "1", timeout_s=0.5) is None
        assert time.monotonic() - start < 0.5 + 1.0
    finally:
        release.set()


def test_math_never_raises_on_garbage():
    for completion in ["\x00", "\\boxed{", "\\frac{" * 200, "<answer>" * 50, "}" * 1000, "\ud800"]:
        assert math_reward("", completion, "2") in (0.0, 1.0, None)


# --- builtin_task --------------------------------------------------------------------------------

HAS_BUILTIN_TASK = importlib.util.find_spec("models.data.builtin_task") is not None


@pytest.mark.skipif(not HAS_BUILTIN_TASK, reason="models/data/builtin_task.py not written yet")
def test_builtin_task_reward_wraps_the_task_verifier():
    from models.data import builtin_task
    reward = get_reward("builtin_task")
    for completion, reference in [
        ("<think>1+2=3</think><answer>3</answer>", "3"),
        ("<answer>4</answer>", "3"),
        ("garbage", "3"),
        ("<answer>3</answer>", "not an int"),
    ]:
        assert reward("", completion, reference) == builtin_task.verify("", completion, reference)
    assert reward("", "<answer>3</answer>", "3") == 1.0
    assert reward("", "<answer>4</answer>", "3") == 0.0


def test_builtin_task_reward_turns_verifier_errors_into_none(monkeypatch):
    import types

    fake = types.ModuleType("models.data.builtin_task")

    def broken(prompt, completion, reference):
        raise ValueError("bug in the task verifier")

    fake.verify = broken
    monkeypatch.setitem(sys.modules, "models.data.builtin_task", fake)
    assert get_reward("builtin_task")("", "<answer>3</answer>", "3") is None
