import json
import os

import pandas as pd
import pytest

from data_contracts.errors import ContractError
from data_contracts.evals import validate_evals
from data_contracts.io import read_table, write_jsonl_atomic
from data_contracts.preferences import validate_preferences
from data_contracts.problems import validate_problems
from data_contracts.rollouts import validate_rollouts
from data_contracts.samples import reward_columns, validate_samples
from data_contracts.sft import detect_sft_format, load_sft_dataset, validate_sft


def write_lines(path, lines):
    path.write_bytes(b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines))
    return path


def jl(**rec):
    return json.dumps(rec)


def load_problems(path):
    return validate_problems(read_table(path), str(path))


def assert_error(exc_info, path, row, field):
    err = exc_info.value
    assert (err.file, err.row, err.field) == (str(path), row, field), str(err)


GOOD_PC = [jl(prompt="Q: 1+2\nA:", completion="<answer>3</answer>")] * 2


def test_error_message_format():
    err = ContractError("data/train.jsonl", 3, "completion", "empty text")
    assert str(err) == "data/train.jsonl: row 3, field 'completion': empty text"
    assert str(ContractError("data/train.jsonl", None, "completion", "missing column")) == (
        "data/train.jsonl: field 'completion': missing column"
    )
    assert isinstance(err, ValueError)


def test_missing_column(tmp_path):
    p = write_lines(tmp_path / "train.jsonl", [jl(prompt="a"), jl(prompt="b")])
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, None, "completion")
    assert str(e.value) == f"{p}: field 'completion': missing column"


def test_empty_text_and_row_is_line_number(tmp_path):
    # line 2 is blank: rows stay line numbers, so the empty completion on line 4 is row 4
    p = write_lines(tmp_path / "train.jsonl", [GOOD_PC[0], "", GOOD_PC[0], jl(prompt="x", completion="")])
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, 4, "completion")
    assert e.value.reason == "empty text"


def test_whitespace_only(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [*GOOD_PC, jl(prompt=" \n\t ", completion="x")])
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, 3, "prompt")
    assert e.value.reason == "whitespace-only text"


def test_wrong_type(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [*GOOD_PC, jl(prompt="x", completion=7)])
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, 3, "completion")
    assert e.value.reason == "expected a string or a list of assistant messages, got int"


def test_null_and_absent_key(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [GOOD_PC[0], jl(prompt=None, completion="x")])
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, 2, "prompt")
    assert e.value.reason == "null"
    p = write_lines(tmp_path / "u.jsonl", [GOOD_PC[0], jl(prompt="x")])
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, 2, "completion")


def test_first_failing_row_wins(tmp_path):
    # row 2 fails on completion, row 3 on prompt: report row 2; within a row, the first field
    lines = [GOOD_PC[0], jl(prompt="x", completion=""), jl(prompt="", completion="")]
    p = write_lines(tmp_path / "t.jsonl", lines)
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, 2, "completion")
    p = write_lines(tmp_path / "u.jsonl", [GOOD_PC[0], jl(prompt="", completion="")])
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, 2, "prompt")


def test_bad_utf8_names_its_line(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [*GOOD_PC, b'{"prompt": "\xff\xfe", "completion": "x"}'])
    with pytest.raises(ContractError) as e:
        read_table(p)
    assert_error(e, p, 3, None)
    assert e.value.reason == "invalid UTF-8"


def test_invalid_json_and_non_object_lines(tmp_path):
    p = write_lines(tmp_path / "t.jsonl", [GOOD_PC[0], '{"prompt": "x", '])
    with pytest.raises(ContractError) as e:
        read_table(p)
    assert_error(e, p, 2, None)
    assert e.value.reason.startswith("invalid JSON")
    p = write_lines(tmp_path / "u.jsonl", [GOOD_PC[0], "", "[1, 2]"])
    with pytest.raises(ContractError) as e:
        read_table(p)
    assert_error(e, p, 3, None)


def test_good_problems_and_preferences(tmp_path):
    from dataclasses import asdict

    from models.data.builtin_task import make_problems

    train, _ = make_problems(0, n_train=5, n_test=0)
    p = write_jsonl_atomic([asdict(x) for x in train], tmp_path / "problems.jsonl")
    df = load_problems(p)
    assert df["id"].tolist() == [f"train-0000{i}" for i in range(5)]
    p = tmp_path / "prefs.parquet"
    pd.DataFrame({"prompt": ["a"], "chosen": ["x"], "rejected": ["y"]}).to_parquet(p)
    assert len(validate_preferences(read_table(p), str(p))) == 1


def test_duplicate_id(tmp_path):
    rows = [jl(id=i, prompt="Q: 1+2\nA:", answer="3") for i in ["a", "b", "c", "b"]]
    p = write_lines(tmp_path / "problems.jsonl", rows)
    with pytest.raises(ContractError) as e:
        load_problems(p)
    assert_error(e, p, 4, "id")
    assert e.value.reason == "duplicate value 'b' (first at row 2)"


@pytest.mark.parametrize(
    "messages, reason",
    [
        ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "turn 1: missing 'role'"),
        ([{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}], "last turn is 'user', must be 'assistant'"),
        ([{"role": "user", "content": "y"}], "no assistant turn"),
        ([], "empty conversation"),
        ([{"role": "user", "content": "y"}, {"role": "assistant", "content": " "}], "turn 2: empty content"),
        ([{"role": "bot", "content": "y"}], "turn 1: unknown role 'bot' (want one of system, user, assistant)"),
        ("hello", "expected a list of messages, got str"),
    ],
)
def test_bad_messages(tmp_path, messages, reason):
    good = jl(messages=[{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}])
    p = write_lines(tmp_path / "chat.jsonl", [good, good, jl(messages=messages)])
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, 3, "messages")
    assert e.value.reason == reason


def test_good_sft_files_of_both_formats(tmp_path):
    p = write_lines(tmp_path / "pc.jsonl", GOOD_PC)
    df, fmt = load_sft_dataset(p)
    assert fmt == "prompt_completion" and len(df) == 2
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]
    p = tmp_path / "chat.json"
    p.write_text(json.dumps([{"messages": chat}]))
    df, fmt = load_sft_dataset(p)
    assert fmt == "messages" and df["messages"].iloc[0] == chat
    with pytest.raises(ContractError) as e:
        detect_sft_format(pd.DataFrame({"text": ["x"]}), "d.jsonl")
    assert_error(e, "d.jsonl", None, None)


def test_parquet_with_bad_row(tmp_path):
    p = tmp_path / "prefs.parquet"
    pd.DataFrame({"prompt": ["a", "b", "c"], "chosen": ["x", "y", "z"], "rejected": ["w", "y", "q"]}).to_parquet(p)
    with pytest.raises(ContractError) as e:
        validate_preferences(read_table(p), str(p))
    assert_error(e, p, 2, "rejected")  # chosen == rejected
    chat = [{"role": "user", "content": "1+2"}, {"role": "assistant", "content": "3"}]
    p = tmp_path / "chat.parquet"
    pd.DataFrame({"messages": [chat, chat[:1]]}).to_parquet(p)
    with pytest.raises(ContractError) as e:
        load_sft_dataset(p)
    assert_error(e, p, 2, "messages")
    pd.DataFrame({"messages": [chat, chat]}).to_parquet(p)
    assert load_sft_dataset(p)[1] == "messages"


def eval_row(**over):
    row = dict(problem_id="test-00001", sample_idx=0, greedy=True, completion="", reward=None,
               correct=False, num_tokens=0, finish_reason="length")
    return {**row, **over}


def test_evals_contract():
    df = pd.DataFrame([eval_row(), eval_row(sample_idx=1, reward=1.0, correct=True, finish_reason="stop")])
    validate_evals(df, "evals.jsonl")
    for bad, field in [
        (dict(sample_idx=-1), "sample_idx"),
        (dict(greedy="yes"), "greedy"),
        (dict(finish_reason="max"), "finish_reason"),
        (dict(num_tokens=1.5), "num_tokens"),
        (dict(reward="1"), "reward"),
        (dict(correct=None), "correct"),
    ]:
        df = pd.DataFrame([eval_row(), eval_row(**bad)], dtype=object)
        with pytest.raises(ContractError) as e:
            validate_evals(df, "evals.jsonl")
        assert_error(e, "evals.jsonl", 2, field)


def test_samples_and_rollouts_contracts(tmp_path):
    base = dict(prompt_id="p1", prompt="Q: 1+2\nA:", completion="<answer>3</answer>", total=1.0, length=5,
                finish_reason="stop")
    rows = [{**base, "reward/correct": 1.0, "reward/format": None}, {**base, "reward/correct": 0, "reward/format": 0.5}]
    p = write_jsonl_atomic(rows, tmp_path / "samples.jsonl")
    df = validate_samples(read_table(p), str(p))
    assert reward_columns(df) == ["reward/correct", "reward/format"]
    rows.append({**base, "reward/correct": "high", "reward/format": 1.0})
    write_jsonl_atomic(rows, p)
    with pytest.raises(ContractError) as e:
        validate_samples(read_table(p), str(p))
    assert_error(e, p, 3, "reward/correct")

    roll = dict(prompt_id="p1", prompt="Q", completion="x", reward=1.0, advantage=-0.5, length=1)
    validate_rollouts(pd.DataFrame([roll]), "r")
    with pytest.raises(ContractError) as e:
        validate_rollouts(pd.DataFrame([roll, {**roll, "advantage": float("nan")}]), "r")
    assert_error(e, "r", 2, "advantage")


def test_write_jsonl_atomic_round_trip(tmp_path):
    df = pd.DataFrame([eval_row(reward=0.5), eval_row(sample_idx=1)])
    p = write_jsonl_atomic(df, tmp_path / "sub" / "evals.jsonl")
    lines = p.read_text().splitlines()
    assert json.loads(lines[1])["reward"] is None  # NaN written as null
    back = validate_evals(read_table(p), str(p))
    assert back["sample_idx"].tolist() == [0, 1]
    assert [f for f in os.listdir(p.parent)] == ["evals.jsonl"]  # no temp file left behind


def test_write_jsonl_atomic_failure_leaves_old_file(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text('{"a": 1}\n')

    def rows():
        yield {"a": 2}
        raise RuntimeError("producer died")

    with pytest.raises(RuntimeError):
        write_jsonl_atomic(rows(), p)
    assert p.read_text() == '{"a": 1}\n'
    assert os.listdir(tmp_path) == ["out.jsonl"]
