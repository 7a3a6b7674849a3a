"""The built-in verifiable reasoning task: left-to-right arithmetic chains of single digits.

A problem is an expression such as ``4-0+2-7``. The SFT solution works it out one step per line
inside ``<think>…</think>`` and puts the integer result in ``<answer>…</answer>``; the verifier
compares that integer with the reference. Everything here is a pure function of a seed and strings:
no I/O, no Prefect, no MLflow.

What this module does not do: tokenize, pack documents into sequences, or write files.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass

TASK_VERSION = "1"

PROMPT_TEMPLATE = "Q: {question}\nA:"
"""The prompt every stage (SFT, RL, sampling, eval) puts before the completion."""

STOP_STRINGS = ("</answer>",)

_OPS = "+-"


@dataclass(frozen=True)
class Problem:
    """One task instance. ``solution`` is the SFT completion that follows ``prompt``."""

    id: str
    question: str
    prompt: str
    answer: str
    solution: str


def _steps(question: str) -> list[tuple[int, str, int, int]]:
    """(left, op, digit, result) for each step of ``question``, evaluated left to right."""
    acc = int(question[0])
    steps = []
    for i in range(1, len(question), 2):
        op, digit = question[i], int(question[i + 1])
        result = acc + digit if op == "+" else acc - digit
        steps.append((acc, op, digit, result))
        acc = result
    return steps


def evaluate(question: str) -> int:
    """The value of a chain such as ``4-0+2-7`` (= -1)."""
    steps = _steps(question)
    return steps[-1][3] if steps else int(question)


def solution_for(question: str) -> str:
    """The SFT completion: ``<think>4-0=4\\n4+2=6\\n6-7=-1</think><answer>-1</answer>``."""
    lines = [f"{a}{op}{d}={r}" for a, op, d, r in _steps(question)]
    return "<think>" + "\n".join(lines) + f"</think><answer>{evaluate(question)}</answer>"


def worked_text(question: str) -> str:
    """A free-form worked solution in another style than SFT's, for the pretraining mix.

    ``4-0+2-7`` -> ``4-0 is 4, 4+2 is 6, 6-7 is -1, so the result is -1.``
    """
    parts = [f"{a}{op}{d} is {r}" for a, op, d, r in _steps(question)]
    return ", ".join(parts) + f", so the result is {evaluate(question)}."


# "qa" is the SFT/R1 prompt; "plain" is how expressions appear in the pretraining corpus, which is
# what a base model that never saw the SFT format can answer (the R1-Zero recipe starts there);
# "chat" is a user's request to an instruct model, which its chat template wraps as a user turn.
CHAT_PROMPT = (
    "Compute {question}. Work it out one operation at a time inside <think></think>, one step per line, "
    "then give the result inside <answer></answer>."
)
PROMPT_STYLES = {"qa": PROMPT_TEMPLATE, "plain": "{question}=", "chat": CHAT_PROMPT}


def make_problem(pid: str, question: str, prompt_style: str = "qa") -> Problem:
    return Problem(
        id=pid,
        question=question,
        prompt=PROMPT_STYLES[prompt_style].format(question=question),
        answer=str(evaluate(question)),
        solution=solution_for(question),
    )


def _random_question(rng: random.Random, min_operands: int, max_operands: int) -> str:
    n = rng.randint(min_operands, max_operands)
    out = [str(rng.randrange(10))]
    for _ in range(n - 1):
        out.append(rng.choice(_OPS))
        out.append(str(rng.randrange(10)))
    return "".join(out)


def _check_range(min_operands: int, max_operands: int) -> None:
    if not 2 <= min_operands <= max_operands:
        raise ValueError(f"need 2 <= min_operands <= max_operands, got {min_operands}, {max_operands}")


def _n_questions(min_operands: int, max_operands: int) -> int:
    # k digits and k-1 operators: 10**k * 2**(k-1) distinct chains of k operands
    return sum(10**k * 2 ** (k - 1) for k in range(min_operands, max_operands + 1))


def _unique_questions(
    rng: random.Random, n: int, exclude: set[str], min_operands: int, max_operands: int
) -> list[str]:
    available = _n_questions(min_operands, max_operands) - len(exclude)
    if n > available:
        raise ValueError(f"asked for {n} distinct questions but only {available} exist")
    seen: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        q = _random_question(rng, min_operands, max_operands)
        if q not in seen and q not in exclude:
            seen.add(q)
            out.append(q)
    return out


def make_problems(
    seed: int, n_train: int, n_test: int, min_operands: int = 3, max_operands: int = 6, prompt_style: str = "qa"
) -> tuple[list[Problem], list[Problem]]:
    """Deterministic (train, test) splits for ``seed``, disjoint by question.

    The test split comes from its own random stream, drawn first, so it depends on the seed (and the
    operand range) alone: growing ``n_train`` never changes which problems are held out.
    """
    _check_range(min_operands, max_operands)
    test_rng = random.Random(f"builtin-task/{seed}/test")
    train_rng = random.Random(f"builtin-task/{seed}/train")
    test_q = _unique_questions(test_rng, n_test, set(), min_operands, max_operands)
    train_q = _unique_questions(train_rng, n_train, set(test_q), min_operands, max_operands)
    test = [make_problem(f"test-{i:05d}", q, prompt_style) for i, q in enumerate(test_q)]
    train = [make_problem(f"train-{i:05d}", q, prompt_style) for i, q in enumerate(train_q)]
    return train, test


def n_operands(question: str) -> int:
    """``4-0+2-7`` -> 4."""
    return (len(question) + 1) // 2


def sft_demonstrations(
    train: list[Problem], seed: int, max_operands: int | None = None, long_fraction: float = 0.0
) -> list[Problem]:
    """The training problems that get a worked SFT demonstration, in ``train``'s order.

    ``max_operands=None`` keeps every problem. Otherwise every chain of at most ``max_operands``
    operands is kept, and each longer one with probability ``long_fraction``, decided by a seeded
    hash of its question alone (so a problem's fate never depends on ``n_train`` or on its
    neighbours). The others stay RL prompts: they have a reference answer, no demonstration. That
    is the R1 setting, where worked solutions are scarce and cover the easy problems, and what is
    left for RL is to carry the procedure to longer chains.
    """
    if not 0.0 <= long_fraction <= 1.0:
        raise ValueError(f"long_fraction must be in [0, 1], got {long_fraction}")
    if max_operands is None:
        return list(train)

    def kept(p: Problem) -> bool:
        if n_operands(p.question) <= max_operands:
            return True
        digest = hashlib.sha256(f"builtin-task/{seed}/sft/{p.question}".encode()).digest()
        return int.from_bytes(digest[:8], "big") < long_fraction * 2**64

    return [p for p in train if kept(p)]


def checked_text(question: str, guess: int) -> str:
    """An answer followed by a check that works the chain out: the pretraining mix's self-check.

    ``("4-0+2-7", 3)`` -> ``4-0+2-7=3. Wait, let me check: 4-0 is 4, …, 6-7 is -1, so the result is -1.``
    The final answer is the worked one, whatever the guess was.
    """
    return f"{question}={guess}. Wait, let me check: {worked_text(question)}"


def pretrain_corpus(
    seed: int,
    n_docs: int,
    exclude_questions: set[str],
    worked_fraction: float = 0.05,
    min_operands: int = 3,
    max_operands: int = 6,
    check_fraction: float = 0.0,
    worked_after_question: bool = False,
    guess_accuracy: float = 0.5,
) -> list[str]:
    """Pretraining documents, never in the SFT format and never on an excluded (test) question:

    - ``4-0+2-7=-1`` lines (the rest);
    - ``worked_fraction`` worked out in prose (``worked_text``), standing alone or, with
      ``worked_after_question``, after the question as the lines are (``4-0+2-7= 4-0 is 4, …``), so
      that after a prompt ``4-0+2-7=`` a base model may either answer or work it out;
    - ``check_fraction`` answered and then checked by working the chain out (``checked_text``); the
      first answer is right with probability ``guess_accuracy``, else off by 1 to 3.

    Questions may repeat across documents, as they would in web text. With ``check_fraction`` 0 and
    ``worked_after_question`` False this is the corpus of earlier versions, document for document.
    """
    _check_range(min_operands, max_operands)
    for name, value in (("worked_fraction", worked_fraction), ("check_fraction", check_fraction),
                        ("guess_accuracy", guess_accuracy)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if worked_fraction + check_fraction > 1.0:
        raise ValueError(f"worked_fraction + check_fraction must be at most 1, got {worked_fraction + check_fraction}")
    if _n_questions(min_operands, max_operands) <= len(exclude_questions):
        raise ValueError("every question is excluded; nothing to pretrain on")
    rng = random.Random(f"builtin-task/{seed}/pretrain")
    docs: list[str] = []
    while len(docs) < n_docs:
        q = _random_question(rng, min_operands, max_operands)
        if q in exclude_questions:
            continue
        u = rng.random()
        if u < worked_fraction:
            docs.append(f"{q}= {worked_text(q)}" if worked_after_question else worked_text(q))
        elif u < worked_fraction + check_fraction:
            value = evaluate(q)
            guess = value
            if rng.random() >= guess_accuracy:
                guess = value + rng.choice((-3, -2, -1, 1, 2, 3))
            docs.append(checked_text(q, guess))
        else:
            docs.append(f"{q}={evaluate(q)}")
    return docs


# --- verifier ---------------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INT_RE = re.compile(r"[+-]?[0-9]+")
_MINUS_SIGNS = str.maketrans({"\u2212": "-", "\u2013": "-", "\u2014": "-", "\ufe63": "-", "\uff0d": "-"})


def parse_int(text: str) -> int | None:
    """``" - 7 "`` -> -7, ``"+3"`` -> 3, ``"\u22127"`` (unicode minus) -> -7; anything else None."""
    if not isinstance(text, str):
        return None
    s = "".join(text.translate(_MINUS_SIGNS).split())
    if not _INT_RE.fullmatch(s):
        return None
    try:
        return int(s)
    except ValueError:  # more digits than int() accepts from a string
        return None


def extract_answer(completion: str) -> str | None:
    """The integer in ``<answer>…</answer>``, normalised (``"-7"``), or None.

    None when there is no closed answer block, its content is not an integer, several blocks
    disagree (hedging is not rewarded), or an ``<answer>`` is left open after the last block
    (a truncated completion).
    """
    if isinstance(completion, bytes):
        completion = completion.decode("utf-8", errors="replace")
    if not isinstance(completion, str):
        return None
    blocks = _ANSWER_RE.findall(completion)
    if not blocks:
        return None
    tail = completion[completion.rfind("</answer>") + len("</answer>") :]
    if "<answer>" in tail:
        return None
    values = {parse_int(b) for b in blocks}
    if len(values) != 1 or None in values:
        return None
    return str(values.pop())


def verify(prompt: str, completion: str, reference: str) -> float | None:
    """1.0 if the completion's answer equals ``reference`` as an integer, else 0.0.

    None only when ``reference`` is not an integer (the sample cannot be judged). Never raises on
    whatever the completion contains. ``prompt`` is unused: the signature is the shared reward one.
    """
    ref = parse_int(reference) if isinstance(reference, str) else None
    if ref is None:
        if isinstance(reference, int) and not isinstance(reference, bool):
            ref = reference
        else:
            return None
    got = extract_answer(completion)
    return 1.0 if got is not None and int(got) == ref else 0.0


_RESULT_IS_RE = re.compile(r"result is\s*([+\-\u2212]?\s*[0-9]+)")
_LEADING_INT_RE = re.compile(r"^\s*([+\-\u2212]?\s*[0-9]+)")


def extract_answer_lenient(completion: str) -> str | None:
    """``extract_answer`` when the completion has an answer block; otherwise the answer a base
    model gives in the pretraining corpus' styles: the last "result is N", else a leading integer
    (``4-0+2-7=`` → ``-1``)."""
    if isinstance(completion, bytes):
        completion = completion.decode("utf-8", errors="replace")
    if not isinstance(completion, str):
        return None
    if "<answer>" in completion:
        return extract_answer(completion)
    for pattern in (_RESULT_IS_RE, _LEADING_INT_RE):
        hits = pattern.findall(completion)
        if hits:
            value = parse_int(hits[-1].replace(" ", ""))
            return None if value is None else str(value)
    return None


def verify_lenient(prompt: str, completion: str, reference: str) -> float | None:
    """``verify`` with ``extract_answer_lenient``: R1-Zero's correctness-only reward from a base."""
    ref = parse_int(reference) if isinstance(reference, str) else None
    if ref is None:
        return None
    got = extract_answer_lenient(completion)
    return 1.0 if got is not None and int(got) == ref else 0.0
