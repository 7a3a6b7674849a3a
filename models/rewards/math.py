"""Math reward: is the completion's final answer equivalent to the reference, per math-verify?

The answer is taken from the completion in this order: the content of the last
``<answer>…</answer>``; else the last ``\\boxed{…}``; else the whole completion. Reference and
answer are parsed with ``math_verify.parse`` and compared with ``math_verify.verify``
(HF math-verify: symbolic + numeric equivalence via sympy).

math-verify's own timeouts use ``signal.alarm``, which only works on the main thread and clobbers
any other alarm; rewards run in worker threads, so those are switched off
(``parsing_timeout=None``, ``timeout_seconds=None``) and the whole check runs in a daemon thread
that we wait on with a wall-clock limit. A check that overruns is scored ``None``; its thread
cannot be killed and finishes (or not) in the background, but being a daemon it never blocks
interpreter exit (a ThreadPoolExecutor worker would: its threads are joined at exit).
"""

from __future__ import annotations

import logging
import re
import threading

from models.rewards import register_reward

logger = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0


def _not_timeout_disabled(record: logging.LogRecord) -> bool:
    """Drop math-verify's "Timeout is disabled ..." warning: this module owns the timeout (see above)."""
    return not str(record.msg).startswith("Timeout is disabled")


for _name in ("math_verify.parser", "math_verify.grader"):  # the two modules that warn once per process
    logging.getLogger(_name).addFilter(_not_timeout_disabled)
_ANSWER = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)


def _last_boxed(text: str) -> str | None:
    """The last ``\\boxed{…}`` (braces matched, so nested ``\\frac{}{}`` survive), or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        depth = 0
        for i in range(start + len("\\boxed"), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start : i + 1]
        start = text.rfind("\\boxed{", 0, start)  # unclosed: try an earlier one
    return None


def extract_answer(completion: str) -> str:
    """The part of ``completion`` that is its final answer (see module docstring for the order)."""
    answers = _ANSWER.findall(completion)
    if answers:
        return answers[-1].strip()
    boxed = _last_boxed(completion)
    return boxed if boxed is not None else completion.strip()


def _parse(text: str) -> list:
    """math-verify parse, or [] when nothing mathematical was found.

    Bare LaTeX like ``x^2+2x+1`` needs ``$…$`` to be recognised. A parse holding only strings is
    math-verify's "first_match" fallback echoing the raw text (``"@@@"`` → ``["@@@"]``): that is
    not an expression, so it counts as unparseable.
    """
    from math_verify import parse

    def expressions(candidate: str) -> list:
        parsed = parse(candidate, parsing_timeout=None)
        return parsed if any(not isinstance(item, str) for item in parsed) else []

    parsed = expressions(text)
    if not parsed and "$" not in text:
        parsed = expressions(f"${text}$")
    return parsed


def _judge(completion: str, reference: str) -> float | None:
    from math_verify import verify

    gold = _parse(reference)
    if not gold:
        logger.warning("math reward: reference %r is not parseable; sample not judged", reference)
        return None
    answer_text = extract_answer(completion)
    if not answer_text:
        return 0.0
    answer = _parse(answer_text)
    if not answer:
        return 0.0
    return 1.0 if verify(gold, answer, timeout_seconds=None) else 0.0


def verify_math_answer(
    completion: str, reference: str, timeout_s: float = DEFAULT_TIMEOUT_S
) -> float | None:
    """1.0 if equivalent, 0.0 if not, None if the reference is unparseable or time ran out.

    Safe to call from any thread; never raises.
    """
    if not isinstance(completion, str) or not isinstance(reference, str):
        return None
    outcome: dict[str, float | None] = {}
    done = threading.Event()

    def work() -> None:
        try:
            outcome["score"] = _judge(completion, reference)
        except Exception:  # sympy can raise almost anything on odd input: not judged
            logger.exception("math reward: math-verify raised; sample not judged")
            outcome["score"] = None
        finally:
            done.set()

    threading.Thread(target=work, name="math-verify", daemon=True).start()
    if not done.wait(timeout_s):
        logger.warning("math reward: math-verify exceeded %.1fs; sample not judged", timeout_s)
        return None
    return outcome.get("score")


@register_reward("math")
def math_reward(prompt: str, completion: str, reference: str) -> float | None:
    """Final-answer equivalence with math-verify under a ``DEFAULT_TIMEOUT_S`` wall-clock limit."""
    return verify_math_answer(completion, reference, DEFAULT_TIMEOUT_S)
