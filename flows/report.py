"""What the CLI shows: a live progress bar per stage (steps, loss, ETA) and the final stage table."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


class RichReporter:
    def __init__(self, console: Console | None = None):
        self.progress = Progress(
            TextColumn("[bold]{task.fields[stage]:<16}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=False,
        )
        self.tasks: dict[str, int] = {}

    def __enter__(self):
        self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        return self.progress.__exit__(*exc)

    def stage_started(self, stage, total):
        if stage in self.tasks:
            self.progress.reset(self.tasks[stage], total=total)
        else:
            self.tasks[stage] = self.progress.add_task("", total=total, stage=stage, info="")

    def update(self, stage, metrics):
        if stage not in self.tasks:
            self.stage_started(stage, metrics.get("max_steps"))
        loss = metrics.get("loss")
        self.progress.update(self.tasks[stage], completed=int(metrics.get("step", 0)),
                             info=f"loss {loss:.4f}" if loss is not None else "")

    def note(self, stage, line):
        self.progress.console.print(f"[posttrain] {stage}: {line}", markup=False, highlight=False)

    def stage_finished(self, stage, cached, seconds):
        if stage not in self.tasks:
            self.tasks[stage] = self.progress.add_task("", total=1, stage=stage, info="")
        self.progress.update(self.tasks[stage], total=1, completed=1,
                             info=("cache hit" if cached else "done") + f" {seconds:.1f}s")


def _fmt(v) -> str:
    return "—" if v is None else f"{100 * v:.1f}%"


def print_table(summary: dict, console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"posttrain {summary.get('recipe', '')} — flow run {summary.get('flow_run_id', '')}")
    for col in ("stage", "cached", "wall s", "pass@1", "pass@k", "maj@k", "mean len", "MLflow run"):
        table.add_column(col)
    for row in summary["stages"]:
        m = row.get("metrics") or {}
        pk = next((v for k, v in m.items() if k.startswith("pass@") and k != "pass@1"), None)
        mk = next((v for k, v in m.items() if k.startswith("maj@")), None)
        table.add_row(
            row["stage"], "yes" if row["cached"] else "no", f"{row['wall_seconds']:.1f}", _fmt(m.get("pass@1")),
            _fmt(pk), _fmt(mk), f"{m['mean_length']:.1f}" if "mean_length" in m else "—",
            str(row.get("mlflow_run_id") or "—"),
        )
    console.print(table)
    console.print(f"MLflow parent run: {summary.get('mlflow_parent_run_id')}")
    if summary.get("report_png"):
        console.print(f"Report plot: {summary['report_png']}")
    for line in tracking_lines(summary):  # plain print: a path wrapped by the console is no use
        print(line, flush=True)


def tracking_lines(summary: dict) -> list[str]:
    """What happened to the run's tracking, said once and plainly: replayed, or queued for later."""
    lines = []
    replayed = summary.get("tracking_replayed") or {}
    if replayed.get("journals"):
        lines.append(f"Tracking: replayed {replayed['calls']} calls queued by {replayed['journals']} earlier "
                     f"run(s) into {', '.join(replayed['uris'])}.")
    if replayed.get("error"):
        lines.append(f"Tracking: the queued calls of earlier runs could not be replayed ({replayed['error']}); "
                     "they stay queued for `posttrain sync`.")
    if summary.get("tracking_queued"):
        lines.append(f"Tracking: the MLflow store did not answer, so nothing of this run is in it yet: "
                     f"{summary['tracking_queued']} calls are queued in {summary['tracking_queue']}. The run, "
                     "its outputs and its cache are complete; `posttrain sync` sends the queue to the store "
                     "when it answers (the next run does too).")
    return lines
