"""Rejection sampling: the sampler's determinism and contract (models/generation/rejection_sampling.py), every filter alone
and composed (models/algorithms/filters.py), and the configs (models/recipes/sample_filter_config.py)."""

from __future__ import annotations

import pandas as pd
import pytest
from pydantic import ValidationError

from models.algorithms.filters import (
    NothingSurvivedError,
    apply_filters,
    filter_best_of_n,
    filter_dedupe,
    filter_format,
    filter_length,
    filter_max_per_prompt,
    filter_pass_rate,
    filter_reward,
    normalize_completion,
)
from models.recipes.sample_filter_config import FILTER_NAMES, FilterConfig, SampleConfig

GOOD = "<think>a b</think><answer>1</answer>"
# id, prompt_id, completion, reward/format, total, length
ROWS = [
    ("s0", "p1", GOOD, 1.0, 1.0, 10),
    ("s1", "p1", GOOD, 1.0, 1.0, 10),  # exact duplicate of s0
    ("s2", "p1", "<think>A  b</think><answer>1</answer>", 1.0, 1.0, 11),  # s0 after normalising
    ("s3", "p1", "<think>x</think><answer>2</answer>", 1.0, 0.0, 8),  # wrong answer
    ("s4", "p2", "<answer>5</answer>", 0.0, 1.0, 4),  # right answer, no think block
    ("s5", "p2", "<think>long</think><answer>5</answer>", 1.0, 1.0, 20),
    ("s6", "p2", "<think>y</think><answer>5</answer>", 1.0, 1.0, 6),
    ("s7", "p3", "garbage", None, 0.0, 72),  # format unjudged
    ("s8", "p2", "<think>z</think><answer>5</answer>", 1.0, 1.0, 6),  # ties s6 on total and length
]


def scored(drop_format: bool = False) -> pd.DataFrame:
    df = pd.DataFrame(ROWS, columns=["id", "prompt_id", "completion", "reward/format", "total", "length"])
    df["prompt"] = "Q: " + df["prompt_id"] + "\nA:"
    df["reference"] = "1"
    df["finish_reason"] = ["stop"] * 7 + ["length", "stop"]
    return df.drop(columns="reward/format") if drop_format else df


def ids(df: pd.DataFrame) -> list[str]:
    return df["id"].tolist()


# ----------------------------------------------------------------------------- each filter alone


def test_filter_format_uses_column_and_treats_none_as_fail():
    assert ids(filter_format(scored())) == ["s0", "s1", "s2", "s3", "s5", "s6", "s8"]


def test_filter_format_computes_reward_when_column_absent():
    # the `format` reward on the completions: s4 has no think block, s7 no tags at all
    assert ids(filter_format(scored(drop_format=True))) == ["s0", "s1", "s2", "s3", "s5", "s6", "s8"]


def test_filter_reward_threshold_inclusive_with_tolerance():
    assert ids(filter_reward(scored(), 1.0)) == ["s0", "s1", "s2", "s4", "s5", "s6", "s8"]
    df = scored()
    df.loc[0, "total"] = 0.7 + 0.2 + 0.1  # 0.9999999999999999: a weighted sum that "is" 1.0
    assert "s0" in ids(filter_reward(df, 1.0))
    assert ids(filter_reward(scored(), 0.0)) == [r[0] for r in ROWS]


def test_filter_length_bounds_inclusive():
    # lengths 10 10 11 8 4 20 6 72 6; keep 6 <= n <= 11
    assert ids(filter_length(scored(), 6, 11)) == ["s0", "s1", "s2", "s3", "s6", "s8"]
    assert ids(filter_length(scored(), None, 6)) == ["s4", "s6", "s8"]
    assert ids(filter_length(scored(), 20, None)) == ["s5", "s7"]


def test_dedupe_exact_vs_normalized():
    assert ids(filter_dedupe(scored(), "exact")) == ["s0", "s2", "s3", "s4", "s5", "s6", "s7", "s8"]
    assert ids(filter_dedupe(scored(), "normalized")) == ["s0", "s3", "s4", "s5", "s6", "s7", "s8"]
    assert len(filter_dedupe(scored(), "none")) == len(ROWS)
    assert normalize_completion("  A\n\t b  C ") == "a b c"


def test_dedupe_is_per_prompt():
    df = pd.DataFrame({"id": ["a", "b", "c"], "prompt_id": ["p1", "p2", "p1"], "completion": ["x", "x", "X "]})
    assert ids(filter_dedupe(df, "exact")) == ["a", "b", "c"]
    assert ids(filter_dedupe(df, "normalized")) == ["a", "b"]


def test_best_of_n_ties_go_to_shortest_then_first():
    # p1: s0, s1, s2 tie on total 1.0; s0 and s1 are shortest (10); s0 comes first.
    # p2: s4 is the shortest of the total-1.0 rows (4). p3: s7 alone.
    assert ids(filter_best_of_n(scored())) == ["s0", "s4", "s7"]
    # after the format filter p2's best are s6 and s8 (total 1.0, length 6): s6 is first
    assert ids(filter_best_of_n(filter_format(scored()))) == ["s0", "s6"]


def test_best_of_n_prefers_higher_total_over_shorter():
    df = pd.DataFrame({"id": ["a", "b"], "prompt_id": ["p", "p"], "total": [0.5, 1.0], "length": [3, 50]})
    assert ids(filter_best_of_n(df)) == ["b"]


def test_max_per_prompt_keeps_first_k_in_order():
    # p1: s0 s1 (s2 s3 dropped); p2: s4 s5 (s6 s8 dropped); p3: s7
    assert ids(filter_max_per_prompt(scored(), 2)) == ["s0", "s1", "s4", "s5", "s7"]
    assert ids(filter_max_per_prompt(scored(), 1)) == ["s0", "s4", "s7"]


def test_pass_rate_drops_every_sample_of_prompts_solved_too_often():
    # passes (total >= 1): p1 3 of 4 (0.75), p2 4 of 4 (1.0), p3 0 of 1 (0.0)
    assert ids(filter_pass_rate(scored(), 0.75, 1.0)) == ["s0", "s1", "s2", "s3", "s7"]
    assert ids(filter_pass_rate(scored(), 0.5, 1.0)) == ["s7"]
    assert ids(filter_pass_rate(scored(), 1.0, 1.0)) == ids(scored())
    # the threshold is min_reward's: with 0.0 every judged row passes, p3's 0.0 included
    assert ids(filter_pass_rate(scored(), 0.99, 0.0)) == []
    with pytest.raises(ValueError, match="max_pass_rate"):
        filter_pass_rate(scored(), 1.5, 1.0)


def test_pass_rate_runs_first_and_counts_every_sample():
    kept, report = apply_filters(scored(), FilterConfig(max_pass_rate=0.75))
    # pass_rate 9 -> 5 (p2's four); format -> s0 s1 s2 s3 (s7); reward -> s0 s1 s2; dedupe -> s0
    assert ids(kept) == ["s0"]
    assert [(r["filter"], r["removed"]) for r in report] == [
        ("pass_rate", 4), ("format", 1), ("reward", 1), ("dedupe", 2), ("max_per_prompt", 0),
    ]  # fmt: skip
    # after the reward filter every surviving row passes, so the same filter there would drop them all
    late = ["format", "reward", "pass_rate", "length", "dedupe", "best_of_n", "max_per_prompt"]
    with pytest.raises(NothingSurvivedError, match="'pass_rate'"):
        apply_filters(scored(), FilterConfig(max_pass_rate=0.75, order=late))
    # an order written before pass_rate existed gets it first
    assert FilterConfig(order=list(FILTER_NAMES[1:])).order == list(FILTER_NAMES)
    with pytest.raises(ValidationError, match="set min_reward"):
        FilterConfig(max_pass_rate=0.5, min_reward=None)


def test_filters_keep_index_and_order():
    out = filter_reward(scored(), 1.0)
    assert out.index.tolist() == [0, 1, 2, 4, 5, 6, 8]


# ----------------------------------------------------------------------------- composition


def test_default_order_and_report():
    cfg = FilterConfig()
    assert cfg.order == list(FILTER_NAMES)
    kept, report = apply_filters(scored(), cfg)
    # format 9 -> 7 (s4, s7); reward 7 -> 6 (s3); length off; dedupe 6 -> 4 (s1, s2);
    # best_of_n off; max_per_prompt 4: p2 has 3 left (s5 s6 s8) -> nothing removed
    assert ids(kept) == ["s0", "s5", "s6", "s8"]
    assert report == [
        {"filter": "format", "before": 9, "removed": 2, "after": 7},
        {"filter": "reward", "before": 7, "removed": 1, "after": 6},
        {"filter": "dedupe", "before": 6, "removed": 2, "after": 4},
        {"filter": "max_per_prompt", "before": 4, "removed": 0, "after": 4},
    ]


def test_composed_with_every_filter_on():
    cfg = FilterConfig(max_per_prompt=2, min_length=5, max_length=12, best_of_n=True)
    kept, report = apply_filters(scored(), cfg)
    # format -> s0 s1 s2 s3 s5 s6 s8; reward -> s0 s1 s2 s5 s6 s8; length (5..12) -> s0 s1 s2 s6 s8;
    # dedupe -> s0 s6 s8; best_of_n -> s0 (p1), s6 (p2: ties s8, first wins); max 2 -> unchanged
    assert ids(kept) == ["s0", "s6"]
    assert [(r["filter"], r["removed"]) for r in report] == [
        ("format", 2), ("reward", 1), ("length", 1), ("dedupe", 2), ("best_of_n", 1), ("max_per_prompt", 0),
    ]  # fmt: skip
    assert all(r["after"] == r["before"] - r["removed"] for r in report)


def test_order_changes_result():
    # max_per_prompt before reward: p1 keeps s0 s1 (both correct), p2 keeps s4 s5 -> format drops s4
    cfg = FilterConfig(max_per_prompt=2, order=["max_per_prompt", "format", "reward", "length", "dedupe", "best_of_n"])
    kept, _ = apply_filters(scored(), cfg)
    assert ids(kept) == ["s0", "s5"]


def test_disabled_filters_are_absent_from_report():
    cfg = FilterConfig(min_reward=None, require_format=False, dedupe="none", max_per_prompt=None)
    kept, report = apply_filters(scored(), cfg)
    assert report == [] and len(kept) == len(ROWS)


def test_nothing_survived_names_filter_and_counts():
    with pytest.raises(NothingSurvivedError) as err:
        apply_filters(scored(), FilterConfig(min_reward=5.0))
    msg = str(err.value)
    assert "'reward'" in msg and "last 7 of 9" in msg and "format -2" in msg and "reward -7" in msg
    assert err.value.report[-1] == {"filter": "reward", "before": 7, "removed": 7, "after": 0}
    with pytest.raises(NothingSurvivedError, match="empty"):
        apply_filters(scored().iloc[:0], FilterConfig())


def test_filter_config_rejects_bad_order_and_unknown_keys():
    with pytest.raises(ValidationError, match="unknown filter"):
        FilterConfig(order=["format", "nope"])
    with pytest.raises(ValidationError, match="exactly once"):
        FilterConfig(order=["format", "reward"])
    with pytest.raises(ValidationError):
        FilterConfig(min_length=10, max_length=5)
    with pytest.raises(ValidationError):
        FilterConfig(best_of_N=True)
    with pytest.raises(ValidationError):
        SampleConfig(rewards={})
    assert all(f.description for f in (*SampleConfig.model_fields.values(), *FilterConfig.model_fields.values()))


# ----------------------------------------------------------------------------- the sampler


@pytest.fixture(scope="module")
def tiny():
    from models.modeling.tiny_model import build_tiny_model
    from models.modeling.tokenizer import build_tokenizer

    tok = build_tokenizer()
    model = build_tiny_model(tok, seed=0, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    return model, tok


@pytest.fixture(scope="module")
def problems():
    from models.data.builtin_task import make_problems

    train, _ = make_problems(0, 4, 1)
    return [{"id": p.id, "prompt": p.prompt, "answer": p.answer} for p in train]


def small_cfg(**kw) -> SampleConfig:
    # batch_size 5 < 3 prompts x 4 samples: several chunks, one that splits a prompt's group
    return SampleConfig(**{"num_prompts": 3, "num_samples": 4, "max_new_tokens": 12, "batch_size": 5, **kw})


def test_samples_match_contract_and_order(tiny, problems):
    from data_contracts.samples import reward_columns, validate_samples
    from models.generation.rejection_sampling import generate_samples

    df = generate_samples(*tiny, problems, small_cfg())
    validate_samples(df, "<generated>")
    assert reward_columns(df) == ["reward/builtin_task", "reward/format"]
    assert df["prompt_id"].tolist() == [p["id"] for p in problems[:3] for _ in range(4)]
    assert df["sample_idx"].tolist() == [0, 1, 2, 3] * 3
    assert df["reference"].tolist() == [p["answer"] for p in problems[:3] for _ in range(4)]
    assert all(1 <= n <= 12 for n in df["length"])
    # total = 1.0 * builtin_task + 0.0 * format (None parts count 0)
    for bt, total in zip(df["reward/builtin_task"], df["total"]):
        assert total == (bt or 0.0)


def test_samples_deterministic_digest(tiny, problems, tmp_path):
    from data_contracts.artifacts import digest_path
    from data_contracts.io import write_jsonl_atomic
    from models.generation.rejection_sampling import generate_samples

    a = write_jsonl_atomic(generate_samples(*tiny, problems, small_cfg()), tmp_path / "a.jsonl")
    b = write_jsonl_atomic(generate_samples(*tiny, problems, small_cfg()), tmp_path / "b.jsonl")
    c = write_jsonl_atomic(generate_samples(*tiny, problems, small_cfg(seed=1)), tmp_path / "c.jsonl")
    assert digest_path(a) == digest_path(b)
    assert digest_path(a) != digest_path(c)


def test_samples_round_trip_through_file_and_filters(tiny, problems, tmp_path):
    from data_contracts.io import read_table, write_jsonl_atomic
    from data_contracts.samples import validate_samples
    from data_contracts.sft import validate_sft
    from models.generation.rejection_sampling import generate_samples, samples_to_sft

    path = write_jsonl_atomic(generate_samples(*tiny, problems, small_cfg()), tmp_path / "s.jsonl")
    back = validate_samples(read_table(path), str(path))  # object dtype, as the filter stage reads it
    cfg = FilterConfig(min_reward=None, require_format=False, dedupe="exact", max_per_prompt=2)
    kept, report = apply_filters(back, cfg)
    assert [r["filter"] for r in report] == ["dedupe", "max_per_prompt"]
    assert kept["prompt_id"].value_counts().max() <= 2
    sft = samples_to_sft(kept)
    assert list(sft.columns) == ["prompt", "completion"]
    validate_sft(sft, "<refine>")


def test_samples_to_sft_drops_blank_completions():
    from models.generation.rejection_sampling import samples_to_sft

    df = pd.DataFrame({"prompt": ["Q: 1\nA:"] * 3, "completion": [GOOD, "  ", "<answer>1</answer>"], "total": 1.0})
    out = samples_to_sft(df)
    assert out["completion"].tolist() == [GOOD, "<answer>1</answer>"] and out.index.tolist() == [0, 1]


def test_unknown_reward_fails_before_sampling(tiny, problems):
    from models.generation.rejection_sampling import generate_samples

    with pytest.raises(ValueError, match="unknown reward"):
        generate_samples(*tiny, problems, small_cfg(rewards={"nope": 1.0}))
