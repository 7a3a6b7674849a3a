"""The end-of-run report: a per-stage table and one PNG (held-out accuracy per checkpoint, RL curve).

Reads the run summary the flow writes (`{"stages": [{"stage", "cached", "wall_seconds", "metrics"},
...]}`) and the RL stage's per-step metric rows; writes nothing but the PNG it is asked for. Uses
matplotlib's Agg canvas directly (no pyplot, so no global figure state and no display needed).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

TABLE_COLUMNS = ("stage", "cached", "wall_seconds", "pass@1", "pass@k", "maj@k", "mean_length")
_PASS_K = re.compile(r"pass@(\d+)")


def _k_of(metrics: dict) -> int | None:
    """The k of the stage's pass@k (the largest k > 1 among its `pass@<k>` keys), or None."""
    ks = [int(m.group(1)) for key in metrics if (m := _PASS_K.fullmatch(str(key))) and int(m.group(1)) > 1]
    return max(ks) if ks else None


def stage_table(summary: dict) -> list[dict]:
    """One row per stage of `summary["stages"]`: stage, cached, wall_seconds, pass@1, pass@k, maj@k,
    mean_length, plus `k` (the k behind pass@k / maj@k). Stages without eval metrics (sample, filter)
    get None in the metric columns."""
    rows = []
    for st in summary.get("stages") or []:
        metrics = st.get("metrics") or {}
        k = _k_of(metrics)
        rows.append(
            {
                "stage": st.get("stage"),
                "cached": st.get("cached"),
                "wall_seconds": st.get("wall_seconds"),
                "pass@1": metrics.get("pass@1"),
                "pass@k": metrics.get(f"pass@{k}") if k else None,
                "maj@k": metrics.get(f"maj@{k}") if k else None,
                "mean_length": metrics.get("mean_length"),
                "k": k,
            }
        )
    return rows


def format_table(rows: list[dict]) -> str:
    """`stage_table` rows as a Markdown table (rates in %, blanks for missing values)."""

    def cell(col: str, v) -> str:
        if v is None:
            return ""
        if col in ("pass@1", "pass@k", "maj@k"):
            return f"{100 * v:.1f}%"
        if isinstance(v, float):
            return f"{v:.1f}"
        return str(v).lower() if isinstance(v, bool) else str(v)

    ks = sorted({r["k"] for r in rows if r.get("k")})
    k = str(ks[0]) if len(ks) == 1 else "k"  # name k in the header when every stage used the same one
    header = [c.replace("@k", f"@{k}") for c in TABLE_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in TABLE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def build_report_figure(summary: dict, rl_curves: dict[str, list[dict]] | None):
    """The report as a matplotlib Figure: accuracy per stage, the RL stages' reward curves and, when
    they logged them, their reasoning signals (marker rates, format rate, lengths)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = {name: rows for name, rows in (rl_curves or {}).items() if rows}
    reasoning = any(k.startswith("marker/") or k == "length_correct" for rows in curves.values() for r in rows for k in r)
    fig = Figure(figsize=(18 if reasoning else 12, 4.8), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if reasoning else 2, width_ratios=(1, 1.2, 1.2) if reasoning else (1, 1.2))
    _accuracy_panel(axes[0], [r for r in stage_table(summary) if r["pass@1"] is not None or r["pass@k"] is not None])
    _rl_panel(axes[1], rl_curves or {})
    if reasoning:
        aha = {r["stage"]: r["aha_step"] for r in summary.get("stages", []) if r.get("aha_step") is not None}
        _reasoning_panel(axes[2], curves, aha)
    title = "posttrain run report"
    if summary.get("recipe"):
        title += f" — recipe {summary['recipe']}" + (" (smoke)" if summary.get("smoke") else "")
    fig.suptitle(title, fontsize=13, fontweight="bold")
    return fig


def _accuracy_panel(ax, rows: list[dict]) -> None:
    ax.set_title("Held-out accuracy after each checkpoint stage")
    if not rows:
        ax.text(0.5, 0.5, "no evaluated stages", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ks = sorted({r["k"] for r in rows if r["k"]})
    k_label = f"pass@{ks[0]}" if len(ks) == 1 else "pass@k"
    series = [("pass@1 (greedy)", "pass@1", "#4C72B0"), (f"{k_label} (sampled)", "pass@k", "#DD8452")]
    x = range(len(rows))
    width = 0.38
    for i, (label, key, color) in enumerate(series):
        xs = [xi + (i - 0.5) * width for xi in x]
        vals = [100 * r[key] if r[key] is not None else 0.0 for r in rows]
        bars = ax.bar(xs, vals, width, label=label, color=color)
        for bar, r in zip(bars, rows):
            text = f"{100 * r[key]:.0f}" if r[key] is not None else "n/a"
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), xytext=(0, 2),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(x), [str(r["stage"]) for r in rows])
    ax.set_ylabel("problems solved (%)")
    ax.set_ylim(0, 110)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="upper left", fontsize=9, frameon=False, ncols=2)


def _rl_panel(ax, rl_curves: dict[str, list[dict]]) -> None:
    curves = {name: rows for name, rows in rl_curves.items() if rows}
    names = ", ".join(curves) if curves else "RL stage"
    ax.set_title(f"{names}: training reward per step")
    if not curves:
        ax.text(0.5, 0.5, "no RL stage in this run", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_xticks([])
        ax.set_yticks([])
        return
    # one colour per metric, one line style per RL stage; accuracy is drawn thinner on top, since with
    # a 0/1 verifier as the only reward the two curves coincide
    metrics = (("reward_mean", "#55A868", "o", 2.4), ("accuracy", "#C44E52", "x", 1.2))
    styles = ["-", "--", ":", "-."]
    values = []
    for i, (name, rows) in enumerate(curves.items()):
        prefix = f"{name} " if len(curves) > 1 else ""
        for key, color, marker, lw in metrics:
            pts = [(r["step"], r[key]) for r in rows if r.get("step") is not None and r.get(key) is not None]
            if pts:
                xs, ys = zip(*sorted(pts))
                values += ys
                ax.plot(xs, ys, styles[i % len(styles)], color=color, lw=lw, marker=marker if len(pts) <= 40 else None,
                        markersize=4, label=f"{prefix}{key}")
    if values and 0.0 <= min(values) and max(values) <= 1.0:
        ax.set_ylim(0, 1.05)  # the same honest 0..100% scale as the left panel
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training batch: mean reward / fraction correct")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=9, frameon=False)


def _reasoning_panel(ax, curves: dict[str, list[dict]], aha: dict[str, int] | None = None) -> None:
    """Marker rates and the answer-format rate (left axis) and the completion length of correct and
    incorrect answers (right axis) per step: a trailing 10-step mean drawn over the raw values, faint;
    a stage's "aha" step (``aha``: stage -> step) as a dotted vertical line."""
    from models.algorithms.reasoning import smooth

    ax.set_title("Reasoning signals per step (10-step mean; raw values faint)")
    right = ax.twinx()
    palette = ["#8172B3", "#937860", "#DA8BC3", "#8C8C8C", "#CCB974", "#64B5CD"]
    styles = ["-", "--", ":", "-."]
    handles = []
    for i, (name, rows) in enumerate(curves.items()):
        prefix = f"{name} " if len(curves) > 1 else ""
        rate_keys = sorted({k for r in rows for k in r if k.startswith("marker/")}) + ["format_rate"]
        series = [(ax, k, palette[j % len(palette)]) for j, k in enumerate(rate_keys)]
        series += [(right, "length_correct", "#55A868"), (right, "length_incorrect", "#C44E52")]
        for axis, key, color in series:
            pts = sorted((r["step"], r[key]) for r in rows if r.get("step") is not None and r.get(key) is not None)
            if not pts:
                continue
            xs, ys = zip(*pts)
            axis.plot(xs, ys, styles[i % len(styles)], color=color, lw=0.8, alpha=0.25)
            (line,) = axis.plot(xs, smooth(list(ys), 10), styles[i % len(styles)], color=color, lw=2,
                                label=f"{prefix}{key.removeprefix('marker/')}")
            handles.append(line)
        if (aha or {}).get(name) is not None:
            (line,) = ax.plot([aha[name]] * 2, [0, 1.05], ":", color="black", lw=1.2,
                              label=f"{prefix}aha step {aha[name]}")
            handles.append(line)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("fraction of completions")
    right.set_ylabel("completion tokens (correct / incorrect)")
    ax.grid(alpha=0.3)
    ax.legend(handles=handles, loc="upper left", fontsize=8, frameon=False)


def plot_report(summary: dict, rl_curves: dict[str, list[dict]] | None, out_png: str | os.PathLike) -> str:
    """Write the two-panel report PNG to `out_png` atomically (temp file + os.replace); returns its path."""
    fig = build_report_figure(summary, rl_curves)
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fig.savefig(fh, format="png")
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return str(out)


__all__ = ["TABLE_COLUMNS", "stage_table", "format_table", "build_report_figure", "plot_report"]
