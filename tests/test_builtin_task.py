import json

import pytest

from models.data import builtin_task
from models.data.builtin_task import (
    TASK_VERSION,
    Problem,
    checked_text,
    evaluate,
    extract_answer,
    make_problem,
    make_problems,
    pretrain_corpus,
    verify,
    verify_lenient,
    worked_text,
)


def test_problem_format_by_hand():
    p = make_problem("test-00000", "4-0+2-7")
    # 4-0=4, 4+2=6, 6-7=-1
    assert p == Problem(
        id="test-00000",
        question="4-0+2-7",
        prompt="Q: 4-0+2-7\nA:",
        answer="-1",
        solution="<think>4-0=4\n4+2=6\n6-7=-1</think><answer>-1</answer>",
    )


def test_negative_intermediate_steps():
    # 0-4=-4, -4+2=-2, -2-9=-11
    p = make_problem("x", "0-4+2-9")
    assert p.solution == "<think>0-4=-4\n-4+2=-2\n-2-9=-11</think><answer>-11</answer>"
    assert evaluate("9+9+9+9+9+9") == 54


def test_worked_text_style():
    assert worked_text("4-0+2-7") == "4-0 is 4, 4+2 is 6, 6-7 is -1, so the result is -1."


def test_splits_deterministic_disjoint_unique():
    train, test = make_problems(7, n_train=300, n_test=50)
    train2, test2 = make_problems(7, n_train=300, n_test=50)
    assert train == train2 and test == test2
    tq, sq = [p.question for p in train], [p.question for p in test]
    assert len(set(tq)) == 300 and len(set(sq)) == 50
    assert not set(tq) & set(sq)
    assert test[17].id == "test-00017" and train[3].id == "train-00003"
    assert all(3 <= len(p.question.replace("+", "-").split("-")) <= 6 for p in train + test)
    assert all(verify(p.prompt, p.solution, p.answer) == 1.0 for p in train + test)
    other_train, other_test = make_problems(8, n_train=300, n_test=50)
    assert [p.question for p in other_test] != sq


def test_test_split_fixed_by_seed_alone():
    _, test_small = make_problems(3, n_train=10, n_test=40)
    train_big, test_big = make_problems(3, n_train=2000, n_test=40)
    assert test_small == test_big
    assert not {p.question for p in train_big} & {p.question for p in test_big}


def test_operand_range_configurable():
    train, test = make_problems(0, n_train=20, n_test=20, min_operands=2, max_operands=2)
    assert all(len(p.question) == 3 for p in train + test)
    with pytest.raises(ValueError):
        make_problems(0, n_train=1000, n_test=1000, min_operands=2, max_operands=2)  # only 200 exist


def test_pretrain_corpus():
    _, test = make_problems(1, n_train=0, n_test=200, min_operands=3, max_operands=3)
    excluded = {p.question for p in test}
    docs = pretrain_corpus(1, 3000, excluded, worked_fraction=0.1, min_operands=3, max_operands=3)
    assert docs == pretrain_corpus(1, 3000, excluded, worked_fraction=0.1, min_operands=3, max_operands=3)
    assert len(docs) == 3000
    for d in docs:
        assert "<think>" not in d and "<answer>" not in d and "Q:" not in d
        q = d.split("=")[0] if "=" in d else None
        assert q not in excluded
        for e in excluded:  # worked docs start with the first step, not the question; check both
            assert not d.startswith(e + "=")
    worked = [d for d in docs if d.endswith(".")]
    assert 200 < len(worked) < 400  # ~10% of 3000
    plain = [d for d in docs if not d.endswith(".")]
    q, a = plain[0].split("=")
    assert int(a) == evaluate(q)
    assert not [d for d in pretrain_corpus(1, 200, set(), worked_fraction=0.0) if d.endswith(".")]


def test_checked_text_style():
    # the first answer (3) is a guess; the check works the chain out and its result is the final one
    assert checked_text("4-0+2-7", 3) == (
        "4-0+2-7=3. Wait, let me check: 4-0 is 4, 4+2 is 6, 6-7 is -1, so the result is -1.")
    assert verify_lenient("4-0+2-7=", checked_text("4-0+2-7", 3).split("=", 1)[1], "-1") == 1.0


def test_pretrain_corpus_r1_zero_mix():
    _, test = make_problems(1, n_train=0, n_test=200, min_operands=3, max_operands=3)
    excluded = {p.question for p in test}
    kw = dict(worked_fraction=0.2, min_operands=3, max_operands=3, check_fraction=0.3,
              worked_after_question=True, guess_accuracy=0.5)
    docs = pretrain_corpus(1, 4000, excluded, **kw)
    assert docs == pretrain_corpus(1, 4000, excluded, **kw)
    checked = [d for d in docs if "Wait, let me check: " in d]
    worked = [d for d in docs if "= " in d and d not in checked]
    plain = [d for d in docs if d not in checked and d not in worked]
    assert 0.25 < len(checked) / 4000 < 0.35 and 0.15 < len(worked) / 4000 < 0.25
    for d in docs:  # every doc starts with its question, which is never a held-out one
        q = d.split("=")[0]
        assert q not in excluded and len(q) == 5
    for d in worked:  # the question, then its worked text
        q, rest = d.split("= ", 1)
        assert rest == worked_text(q)
    right = 0
    for d in checked:
        q, rest = d.split("=", 1)
        guess = int(rest.split(". Wait")[0])
        assert d == checked_text(q, guess)
        assert guess == evaluate(q) or 1 <= abs(guess - evaluate(q)) <= 3
        right += guess == evaluate(q)
    assert 0.4 < right / len(checked) < 0.6
    assert all(int(d.split("=")[1]) == evaluate(d.split("=")[0]) for d in plain)
    # the defaults draw nothing more: the corpus without the mix is unchanged
    assert pretrain_corpus(1, 300, set(), worked_fraction=0.1) == pretrain_corpus(
        1, 300, set(), worked_fraction=0.1, check_fraction=0.0, worked_after_question=False, guess_accuracy=0.9)
    with pytest.raises(ValueError, match="at most 1"):
        pretrain_corpus(1, 10, set(), worked_fraction=0.6, check_fraction=0.5)
    with pytest.raises(ValueError, match="guess_accuracy"):
        pretrain_corpus(1, 10, set(), guess_accuracy=1.5)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("<think>x</think><answer>-1</answer>", 1.0),
        ("<answer> -1 </answer>", 1.0),
        ("<answer>- 1</answer>", 1.0),
        ("<answer>\u22121</answer>", 1.0),  # unicode minus
        ("<answer>-01</answer>", 1.0),
        ("<answer>1</answer>", 0.0),
        ("<answer>+1</answer>", 0.0),
        ("-1", 0.0),  # no answer block
        ("< answer>-1</answer>", 0.0),
        ("<answer>-1", 0.0),  # truncated
        ("<answer>-1</answer><answer>-1", 0.0),  # trailing unclosed block
        ("<answer>-1</answer> then <answer>-1</answer>", 1.0),  # agreeing
        ("<answer>-1</answer><answer>2</answer>", 0.0),  # hedging
        ("<answer>-1.0</answer>", 0.0),
        ("<answer></answer>", 0.0),
        ("<answer>" + "9" * 5000 + "</answer>", 0.0),  # too long for int(str)
        ("\x00\ud800\ufffd<answer>\udcff</answer>", 0.0),  # garbage, lone surrogates
        ("", 0.0),
    ],
)
def test_verify_edge_cases(completion, expected):
    assert verify("Q: 4-0+2-7\nA:", completion, "-1") == expected


def test_verify_positive_and_sign():
    assert verify("", "<answer>+3</answer>", "3") == 1.0
    assert verify("", "<answer> 3 </answer>", "+3") == 1.0


def test_verify_bad_reference_is_none():
    assert verify("", "<answer>1</answer>", "one") is None
    assert verify("", "<answer>1</answer>", "") is None
    assert verify("", "<answer>1</answer>", None) is None


def test_verify_never_raises_on_non_strings():
    assert verify("", b"<answer>1</answer>\xff", "1") == 1.0
    assert verify("", None, "1") == 0.0


def test_extract_answer():
    assert extract_answer("<answer> \u2212 12 </answer>") == "-12"
    assert extract_answer("<answer>+5</answer>") == "5"
    assert extract_answer("<answer>5</answer><answer>6</answer>") is None
    assert extract_answer("<answer>\n7\n</answer>") == "7"
    assert TASK_VERSION == "1"


def test_plain_prompt_style_and_lenient_verifier():
    from models.data.builtin_task import extract_answer_lenient, make_problems, verify_lenient

    _, test = make_problems(0, 5, 3, prompt_style="plain")
    _, qa = make_problems(0, 5, 3)
    assert [p.question for p in test] == [p.question for p in qa]  # same split, other prompt
    assert test[0].prompt == f"{test[0].question}="
    # a base continues "4-0+2-7=" with the answer, or works it out in the corpus' prose style
    assert extract_answer_lenient("-1") == "-1"
    assert extract_answer_lenient(" \u22121\n4+4=8") == "-1"  # unicode minus; later lines ignored
    assert extract_answer_lenient("4-0 is 4, 4+2 is 6, 6-7 is -1, so the result is -1.") == "-1"
    assert extract_answer_lenient("no digits here") is None
    # an answer block, when present, is judged exactly as the strict verifier does
    assert extract_answer_lenient("<answer>3</answer>") == "3"
    assert extract_answer_lenient("<answer>3</answer><answer>4</answer>") is None
    assert verify_lenient("", "12", "12") == 1.0 and verify_lenient("", "13", "12") == 0.0
    assert verify_lenient("", "12", "twelve") is None


def test_sft_demonstrations_keep_short_chains_and_a_seeded_fraction_of_long_ones():
    train, _ = make_problems(0, n_train=4000, n_test=10)
    assert builtin_task.n_operands("4-0+2-7") == 4 and builtin_task.n_operands("7") == 1
    assert builtin_task.sft_demonstrations(train, 0) == train  # no limit: every problem
    demos = builtin_task.sft_demonstrations(train, 0, max_operands=4, long_fraction=0.1)
    short = [p for p in train if builtin_task.n_operands(p.question) <= 4]
    long = [p for p in train if builtin_task.n_operands(p.question) > 4]
    kept_long = [p for p in demos if builtin_task.n_operands(p.question) > 4]
    assert [p for p in demos if builtin_task.n_operands(p.question) <= 4] == short
    assert 0.07 < len(kept_long) / len(long) < 0.13  # ~2,200 long chains: 10% ± 3 sigma
    assert [p.id for p in demos] == [p.id for p in train if p in demos]  # train's order
    # a problem's fate depends on its question alone: a smaller train set keeps the same ones
    sub = builtin_task.sft_demonstrations(train[:1000], 0, max_operands=4, long_fraction=0.1)
    assert sub == [p for p in demos if p in train[:1000]]
    # another seed picks other long chains; fraction 0 keeps none, 1 keeps all
    other = builtin_task.sft_demonstrations(train, 1, max_operands=4, long_fraction=0.1)
    assert {p.id for p in other} != {p.id for p in demos}
    assert builtin_task.sft_demonstrations(train, 0, max_operands=4) == short
    assert builtin_task.sft_demonstrations(train, 0, max_operands=4, long_fraction=1.0) == train
    with pytest.raises(ValueError, match="long_fraction"):
        builtin_task.sft_demonstrations(train, 0, max_operands=4, long_fraction=1.5)


def test_builtin_datasets_hold_rl_prompts_without_demonstrations(tmp_path):
    from models.config import TaskConfig
    from tasks.data import builtin_dir

    task = TaskConfig(n_train=600, n_test=20, pretrain_docs=10, sft_max_operands=4, sft_long_fraction=0.2)
    d = builtin_dir(task, tmp_path)
    sft = [json.loads(line) for line in (d / "sft_train.jsonl").open()]
    problems = [json.loads(line) for line in (d / "train_problems.jsonl").open()]
    assert len(problems) == 600 and len(sft) < 600
    assert {r["id"] for r in sft} < {r["id"] for r in problems}
    full = builtin_dir(TaskConfig(n_train=600, n_test=20, pretrain_docs=10), tmp_path)
    assert full != d and sum(1 for _ in (full / "sft_train.jsonl").open()) == 600
