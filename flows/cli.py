"""`posttrain` command line.

    posttrain run [RECIPE] [--smoke] [--set key=value ...] [--summary-json PATH] [--state-dir DIR]
    posttrain resume RUN [--force]         rerun a failed/crashed run with its original parameters
    posttrain runs [--json] [--limit N]    the run records of the state dir
    posttrain lineage MODEL_OR_RUN [--json]  walk a model back to its base checkpoint, check digests
    posttrain serve [--only NAME] [--interval S]  serve deployments/prefect.yaml from one process
    posttrain recipes                      list the shipped recipes

Heavy stacks (torch, Prefect, MLflow) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None,
                   help="project state dir (default: $POSTTRAIN_HOME or ./.posttrain)")
    p.add_argument("--tracking-uri", default=None,
                   help="MLflow tracking URI (default: sqlite:///<state dir>/mlflow.db)")
    p.add_argument("--verbose", action="store_true", help="show Prefect's logs")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="Post-train reasoning LMs: Prefect + DeepSpeed + MLflow")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run a recipe end to end (cached stages, resumable)")
    run.add_argument("recipe", nargs="?", default=None, help="shipped recipe name or YAML path (default: r1)")
    run.add_argument("--smoke", action="store_true", help="the recipe's ~2-minute smoke size")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a recipe field, e.g. --set sft.lr=1e-4 (repeatable)")
    run.add_argument("--summary-json", default=None, metavar="PATH", help="write the run summary as JSON")
    run.add_argument("--no-progress", action="store_true", help="no live progress display")
    _add_common(run)
    sub.add_parser("recipes", help="list the shipped recipes")
    resume = sub.add_parser("resume", help="rerun a failed or crashed run with its original parameters")
    resume.add_argument("run_id", metavar="RUN", help="Prefect flow-run id or MLflow parent run id (see `posttrain runs`)")
    resume.add_argument("--force", action="store_true", help="resume even a COMPLETED run")
    resume.add_argument("--summary-json", default=None, metavar="PATH", help="write the run summary as JSON")
    resume.add_argument("--no-progress", action="store_true", help="no live progress display")
    _add_state(resume)
    runs = sub.add_parser("runs", help="list the run records of the state dir, newest first")
    runs.add_argument("--json", action="store_true", help="print a JSON list")
    runs.add_argument("--limit", type=int, default=20, help="at most this many runs (default 20)")
    _add_state(runs)
    lin = sub.add_parser("lineage", help="walk a model back to its base checkpoint and check every digest")
    lin.add_argument("target", metavar="MODEL_OR_RUN",
                     help="output dir, sha256:… digest, models:/name/version, stage or parent MLflow run id, "
                          "or Prefect flow-run id")
    lin.add_argument("--json", action="store_true", help="print the chain as JSON")
    _add_common(lin)
    serve = sub.add_parser("serve", help="serve the deployments of deployments/prefect.yaml from this process")
    serve.add_argument("--only", action="append", default=None, metavar="NAME", help="serve only this one (repeatable)")
    serve.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                       help="run every served deployment on this interval instead of its schedule "
                            "(r1-nightly's cron; on-demand ones get one too): tests, demos")
    serve.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1: stages share the CPU)")
    _add_common(serve)
    return parser


def _add_state(p: argparse.ArgumentParser) -> None:
    p.add_argument("--state-dir", default=None,
                   help="project state dir (default: $POSTTRAIN_HOME or ./.posttrain)")
    p.add_argument("--verbose", action="store_true", help="show Prefect's logs")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "recipes":
        from models.config import RECIPES_DIR, load_recipe

        for p in sorted(RECIPES_DIR.glob("*.yaml")):
            r = load_recipe(p.stem)
            print(f"{p.stem:10s} {' → '.join(r.stages):40s} {r.description}")
        return 0
    handler = {"resume": _resume, "runs": _runs, "lineage": _lineage, "serve": _serve}.get(args.command, _run)
    return handler(args)


def _run(args) -> int:
    from flows.state import prepare_environment

    state_dir = prepare_environment(args.state_dir, quiet=not args.verbose)
    from models.config import RecipeError, load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides, smoke=args.smoke)  # fail fast, before Prefect starts
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    reporter = _install_reporter(args.no_progress)
    params = dict(recipe=args.recipe or cfg.name, overrides=args.overrides, smoke=args.smoke,
                  state_dir=str(state_dir), tracking_uri=args.tracking_uri)
    return execute_flow(params, args.summary_json, reporter)


def _start_temporary_api():
    """Start Prefect's temporary API server in a thread, when the flow will need one (no
    PREFECT_API_URL): its subprocess boots while this process imports torch, MLflow and the flow.
    Returns the thread to join (None when nothing was started). Prefect keeps one such server per
    process (`SubprocessASGIServer()` is a singleton), so the flow's client finds it running."""
    import threading

    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    from prefect.server.api.server import SubprocessASGIServer

    def start():
        try:
            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow's own client retries the start and reports it
            pass

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()
    return thread


def execute_flow(params: dict, summary_json: str | None, reporter) -> int:
    """The one code path that runs the flow for `run` and `resume`: call, explain, print, write."""
    api_start = _start_temporary_api()  # overlaps the server's boot with the imports below
    from data_contracts.errors import ContractError
    from flows.failures import explain
    from flows.post_train import post_train
    from flows.report import print_table

    if api_start is not None:
        api_start.join()  # started (or failed, and the flow's client starts it again) before any call
    try:
        if reporter:
            with reporter:
                summary = post_train(**params)
        else:
            summary = post_train(**params)
    except (ContractError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - only failures we can explain are caught; the rest re-raise
        rec = _this_process_run(params["state_dir"])
        msg = explain(e, params["state_dir"], rec and rec["flow_run_id"], rec and rec.get("failed_stage"))
        if msg is None:
            raise
        print(msg, file=sys.stderr)
        return 3
    print_table(summary)
    if summary_json:
        out = Path(summary_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out)
    return 0


def _resume(args) -> int:
    from flows import runs
    from flows.state import prepare_environment

    state_dir = prepare_environment(args.state_dir, quiet=not args.verbose)
    rec = runs.find_run(state_dir, args.run_id)
    if rec is None:
        print(f"error: no run {args.run_id!r} in {state_dir / 'runs'} (see `posttrain runs`)", file=sys.stderr)
        return 2
    if rec["status"] == "RUNNING":
        print(f"error: run {rec['flow_run_id']} is still running (pid {rec.get('pid')} on {rec.get('host')}); "
              "resuming it now would race it for the same work dirs", file=sys.stderr)
        return 2
    if rec["status"] == "COMPLETED" and not args.force:
        print(f"error: run {rec['flow_run_id']} COMPLETED; `--force` reruns it (all stages cache hits)", file=sys.stderr)
        return 2
    original = rec["parameters"]
    params = dict(recipe=original["recipe"], overrides=list(original.get("overrides") or []),
                  smoke=bool(original.get("smoke")), state_dir=original.get("state_dir") or str(state_dir),
                  tracking_uri=original.get("tracking_uri"), resumed_from=rec["flow_run_id"])
    stage = f" (failed at {rec['failed_stage']})" if rec.get("failed_stage") else ""
    print(f"[posttrain] resuming {rec['status']} run {rec['flow_run_id']}{stage}: recipe {params['recipe']}"
          f"{' --smoke' if params['smoke'] else ''} {' '.join('--set ' + o for o in params['overrides'])}", flush=True)
    return execute_flow(params, args.summary_json, _install_reporter(args.no_progress))


RUN_KEYS = ("flow_run_id", "mlflow_parent_run_id", "recipe", "status", "failed_stage", "started")


def _runs(args) -> int:
    from flows import runs
    from flows.state import resolve_state_dir

    records = [{k: r.get(k) for k in RUN_KEYS} for r in runs.list_runs(resolve_state_dir(args.state_dir), args.limit)]
    if args.json:
        print(json.dumps(records, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(*RUN_KEYS, title=f"runs in {resolve_state_dir(args.state_dir)}")
    for r in records:
        table.add_row(*("" if r[k] is None else str(r[k]) for k in RUN_KEYS))
    Console(width=max(Console().width, 150)).print(table)
    return 0


def _lineage(args) -> int:
    from flows.lineage import LineageError, format_chain, lineage
    from flows.state import prepare_environment
    from tasks.common import default_tracking_uri

    state_dir = prepare_environment(args.state_dir, quiet=not args.verbose)
    try:
        result = lineage(args.target, args.tracking_uri or default_tracking_uri(state_dir), str(state_dir))
    except LineageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_chain(result))
    for p in result["problems"]:
        print(f"lineage broken: {p}", file=sys.stderr)
    return 1 if result["problems"] else 0


def _serve(args) -> int:
    from flows.state import prepare_environment

    state_dir = prepare_environment(args.state_dir, quiet=not args.verbose)
    from flows.serve import ServeError, serve

    try:
        serve(str(state_dir), only=args.only, interval=args.interval, tracking_uri=args.tracking_uri, limit=args.limit)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def _install_reporter(no_progress: bool):
    from flows.report import RichReporter
    from tasks.progress import set_reporter

    reporter = None if no_progress or not sys.stdout.isatty() else RichReporter()
    set_reporter(reporter or _PlainReporter())
    return reporter


def _this_process_run(state_dir: str) -> dict | None:
    from flows import runs

    mine = [r for r in runs.list_runs(state_dir, limit=50) if r.get("pid") == os.getpid()]
    return mine[0] if mine else None


class _PlainReporter:
    """Progress as plain lines (CI logs, pipes): one line every ~10% of a stage."""

    def __init__(self):
        self._total: dict[str, int | None] = {}
        self._next: dict[str, int] = {}

    def stage_started(self, stage, total):
        self._total[stage] = total
        self._next[stage] = 0
        print(f"[posttrain] {stage}: started" + (f" ({total} steps)" if total else ""), flush=True)

    def update(self, stage, metrics):
        step, total = int(metrics.get("step", 0)), self._total.get(stage) or 0
        if total and step >= self._next.get(stage, 0):
            self._next[stage] = step + max(1, total // 10)
            loss = metrics.get("loss")
            print(f"[posttrain] {stage}: step {step}/{total}" + (f" loss {loss:.4f}" if loss is not None else ""),
                  flush=True)

    def stage_finished(self, stage, cached, seconds):
        print(f"[posttrain] {stage}: {'cache hit' if cached else 'done'} in {seconds:.1f}s", flush=True)


if __name__ == "__main__":
    sys.exit(main())
