"""The run report (models/report.py): stage table from a run summary and the two-panel PNG."""

from __future__ import annotations

from models.report import build_report_figure, format_table, plot_report, stage_table

SUMMARY = {
    "recipe": "r1",
    "smoke": True,
    "stages": [
        {"stage": "fetch", "cached": True, "wall_seconds": 12.3,
         "metrics": {"pass@1": 0.0, "pass@8": 0.1, "maj@8": 0.0, "mean_length": 24.0, "num_problems": 64.0}},
        {"stage": "sft", "cached": False, "wall_seconds": 180.0,
         "metrics": {"pass@1": 0.68, "pass@8": 0.9, "maj@8": 0.7, "mean_length": 40.5}},
        {"stage": "grpo", "cached": False, "wall_seconds": 120.0,
         "metrics": {"pass@1": 0.85, "pass@8": 0.95, "maj@8": 0.88, "mean_length": 38.0}},
        {"stage": "sample", "cached": False, "wall_seconds": 30.0},
        {"stage": "filter", "cached": False, "wall_seconds": 0.5, "metrics": None},
        {"stage": "refine", "cached": False, "wall_seconds": 60.0,
         "metrics": {"pass@1": 0.86, "pass@8": 0.95, "maj@8": 0.9, "mean_length": 37.0}},
    ],
}  # fmt: skip

RL = {
    "grpo": [
        {"step": s, "reward_mean": 0.6 + 0.02 * s, "accuracy": 0.5 + 0.03 * s, "loss": 0.1} for s in range(1, 13)
    ]
}


def test_stage_table_rows_and_blanks():
    rows = stage_table(SUMMARY)
    assert [r["stage"] for r in rows] == ["fetch", "sft", "grpo", "sample", "filter", "refine"]
    assert rows[1] == {
        "stage": "sft", "cached": False, "wall_seconds": 180.0, "pass@1": 0.68, "pass@k": 0.9, "maj@k": 0.7,
        "mean_length": 40.5, "k": 8,
    }  # fmt: skip
    assert rows[0]["cached"] is True and rows[0]["pass@k"] == 0.1
    for blank in rows[3:5]:  # sample and filter make no checkpoint: no eval metrics
        assert blank["pass@1"] is None and blank["pass@k"] is None and blank["maj@k"] is None
        assert blank["mean_length"] is None and blank["wall_seconds"] is not None
    assert stage_table({}) == []


def test_format_table_names_k_and_leaves_blanks():
    text = format_table(stage_table(SUMMARY))
    lines = text.splitlines()
    assert lines[0] == "| stage | cached | wall_seconds | pass@1 | pass@8 | maj@8 | mean_length |"
    assert "| sft | false | 180.0 | 68.0% | 90.0% | 70.0% | 40.5 |" in lines
    assert "| sample | false | 30.0 |  |  |  |  |" in lines


def test_plot_report_writes_png_with_two_axes(tmp_path):
    out = plot_report(SUMMARY, RL, tmp_path / "sub" / "report.png")
    data = open(out, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["report.png"]  # no temp file left behind
    fig = build_report_figure(SUMMARY, RL)
    assert len(fig.axes) == 2
    left, right = fig.axes
    assert [t.get_text() for t in left.get_xticklabels()] == ["fetch", "sft", "grpo", "refine"]
    assert len(right.get_lines()) == 2  # reward_mean and accuracy


def test_plot_report_without_rl_or_metrics(tmp_path):
    out = plot_report({"stages": [{"stage": "fetch", "cached": False, "wall_seconds": 1.0}]}, None,
                      tmp_path / "empty.png")  # fmt: skip
    assert open(out, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert len(build_report_figure({}, {}).axes) == 2
