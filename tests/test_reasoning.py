"""Reasoning observability: marker regexes, per-step metrics by hand, the aha step, the clip sides,
and the report's reasoning panel."""

from __future__ import annotations

import math

import pytest
import torch

from models.algorithms.losses import grpo_loss
from models.algorithms.reasoning import BUILTIN_MARKERS, aha_step, chunk_metrics, marker_flags, smooth


@pytest.mark.parametrize("text,step_by_step,self_check", [
    ("<think>4-0=4\n4+2=6</think><answer>6</answer>", True, False),          # the SFT format
    ("4-0 is 4, 4+2 is 6, so the result is 6.", True, False),                # the corpus' worked style
    ("<think>4-0+2=6</think><answer>6</answer>", False, False),             # one step only
    ("<answer>6</answer>", False, False),
    ("<think>4-0=4\n4+2=6\nwait, let me check: 6-2=4</think><answer>6</answer>", True, True),
    ("6. Let me verify: 6", False, True),
])
def test_builtin_markers(text, step_by_step, self_check):
    assert marker_flags(text, BUILTIN_MARKERS) == {"step_by_step": step_by_step, "self_check": self_check}


def test_chunk_metrics_sum_to_the_global_means():
    def item(n, correct, formatted, marked):
        return {"completion_ids": [0] * n, "correct": correct, "formatted": formatted, "markers": {"m": marked}}

    batch = [item(10, True, True, True), item(20, True, False, False), item(5, False, True, False),
             item(7, False, False, False)]
    a, b = chunk_metrics(batch[:2], batch), chunk_metrics(batch[2:], batch)
    total = {k: a[k] + b[k] for k in a}
    # correct: (10 + 20) / 2 = 15; incorrect: (5 + 7) / 2 = 6; formatted 2 of 4; marker 1 of 4
    assert total == {"length_correct": 15.0, "length_incorrect": 6.0, "format_rate": 0.5, "marker/m": 0.25}
    assert a["length_incorrect"] == 0.0 and b["length_correct"] == 0.0


def test_smooth_and_aha_step_by_hand():
    assert smooth([0.0, 1.0, 1.0, 0.0], 2) == [0.0, 0.5, 1.0, 0.5]
    rows = [{"step": s, "r": v} for s, v in enumerate([0.0, 0.6, 0.2, 0.6, 0.7, 0.8], start=1)]
    assert aha_step(rows, "r", 0.5, window=1) == 4          # the dip at step 3 resets it
    # window 2: means 0, .3, .4, .4, .65, .75 -> from step 5 on
    assert aha_step(rows, "r", 0.5, window=2) == 5
    assert aha_step([{"step": 1, "r": 0.9}, {"step": 2, "r": 0.9}], "r", 0.5, 1) is None  # high from the start
    assert aha_step([{"step": 1, "r": 0.0}, {"step": 2, "r": 0.9}, {"step": 3, "r": 0.1}], "r", 0.5, 1) is None
    assert aha_step([{"step": 1}], "r", 0.5, 1) is None


def test_clip_fractions_on_each_side_by_hand():
    # row 0: A = +1, ratio 2 > 1 + 0.2 (high side); row 1: A = -1, ratio 0.5 < 1 - 0.2 (low side);
    # row 2: A = +1, ratio 1 (no clip)
    logprobs = torch.tensor([[math.log(2.0)], [math.log(0.5)], [0.0]])
    old = torch.zeros(3, 1)
    mask = torch.ones(3, 1, dtype=torch.bool)
    _, m = grpo_loss(logprobs, old, torch.tensor([1.0, -1.0, 1.0]), mask, clip_low=0.2, clip_high=0.2)
    assert float(m["clip_high_fraction"]) == pytest.approx(1 / 3)
    assert float(m["clip_low_fraction"]) == pytest.approx(1 / 3)
    assert float(m["clip_fraction"]) == pytest.approx(2 / 3)


def test_aha_step_tags_the_first_logged_batch_after_it():
    from tasks.train import find_aha

    rows = [{"step": s, "marker/self_check": v} for s, v in enumerate([0.0, 0.0, 0.9, 0.9, 0.9, 0.9], start=1)]
    rollouts = [{"step": s, "completion": f"c{s}"} for s in (1, 2, 5)]
    config = {"aha_marker": "self_check", "aha_threshold": 0.5, "aha_window": 1}
    assert find_aha(rows, rollouts, config) == {"step": 3, "completions": [{"step": 5, "completion": "c5"}]}
    assert find_aha(rows, rollouts, dict(config, aha_marker=None)) is None


def test_report_draws_the_reasoning_panel(tmp_path):
    from models.report import build_report_figure, plot_report

    rows = [{"step": s, "reward_mean": 0.1 * s, "accuracy": 0.1 * s, "marker/step_by_step": 0.05 * s,
             "format_rate": 0.5, "length_correct": 30.0, "length_incorrect": 12.0} for s in range(1, 12)]
    summary = {"stages": [{"stage": "grpo", "cached": False, "wall_seconds": 1.0, "metrics": {"pass@1": 0.5}}]}
    fig = build_report_figure(summary, {"grpo": rows})
    titles = [ax.get_title() for ax in fig.axes]
    assert any(t.startswith("Reasoning signals") for t in titles)
    assert len(build_report_figure(summary, {"grpo": [{"step": 1, "reward_mean": 0.1}]}).axes) == 2
    # the stage's aha step (summary row `aha_step`) is a labelled vertical line on the reasoning panel
    summary["stages"][0]["aha_step"] = 7
    panel = next(ax for ax in build_report_figure(summary, {"grpo": rows}).axes
                 if ax.get_title().startswith("Reasoning signals"))
    (aha,) = [ln for ln in panel.get_lines() if ln.get_label() == "aha step 7"]
    assert list(aha.get_xdata()) == [7, 7]
    assert (tmp_path / "r.png").exists() is False and plot_report(summary, {"grpo": rows}, tmp_path / "r.png")


def test_the_summary_row_of_an_rl_stage_carries_its_aha_step():
    from data_contracts.artifacts import ArtifactRef
    from flows.post_train import stage_row
    from models.config import load_recipe
    from tasks.common import StageResult

    nodes = {n.name: n for n in load_recipe("r1-zero").graph()}
    out = ArtifactRef(kind="model", path="/x", digest="sha256:0", run_id="r", stage="grpo")

    def result(extra):
        return StageResult(stage="grpo", output=out, mlflow_run_id="r", cache_key="k", metrics={},
                           resumed_from_step=None, wall_seconds=1.0, extra=extra)

    row = stage_row(nodes["grpo"], result({"aha_step": 23, "metrics_path": "/m"}), False, 1.5)
    assert row["aha_step"] == 23 and row["stage"] == "grpo" and row["wall_seconds"] == 1.5
    assert "aha_step" not in stage_row(nodes["grpo"], result({"metrics_path": "/m"}), True, 0.0)
