"""Running the post_train flow in this process, for `posttrain run` and `posttrain resume`: the
temporary Prefect API started while the heavy imports run, the preflight checks, the failures we can
explain, the summary table and JSON, and the progress reporters (rich on a terminal, plain lines
otherwise)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


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
        from flows.interrupt import unblock_signals

        unblock_signals()  # the server's process inherits this thread's mask: it keeps normal SIGTERM
        try:
            SubprocessASGIServer().start()
        except Exception:  # noqa: BLE001 - the flow's own client retries the start and reports it
            pass

    thread = threading.Thread(target=start, name="prefect-api-start", daemon=True)
    thread.start()
    return thread


def execute_flow(params: dict, summary_json: str | None, reporter, verbose: bool = True) -> int:
    """The one code path that runs the flow for `run` and `resume`: call, explain, print, write."""
    from flows.interrupt import watch_run
    from flows.state import quiet_run_tracebacks

    if not verbose:  # Prefect's copy of a failure's traceback goes to a file; the `error:` line says it all
        quiet_run_tracebacks(params["state_dir"])

    watch_run(params["state_dir"])  # SIGINT/SIGTERM from here on: this run is recorded CANCELLED
    api_start = _start_temporary_api()  # overlaps the server's boot with the imports below
    from data_contracts.errors import ContractError
    from flows.failures import explain
    from flows.pools import PoolError
    from flows.post_train import post_train, preflight
    from flows.report import print_table
    from models.config import load_recipe

    try:  # while the API server boots: bad data fails here, not after Prefect and MLflow start
        preflight(load_recipe(params["recipe"], params.get("overrides") or [], smoke=params.get("smoke", False)),
                  params["state_dir"])
    except (ContractError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if api_start is not None:
        api_start.join()  # started (or failed, and the flow's client starts it again) before any call
    try:
        if reporter:
            with reporter:
                summary = post_train(**params)
        else:
            summary = post_train(**params)
    except (ContractError, FileNotFoundError, PoolError) as e:
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


def install_reporter(no_progress: bool):
    """Progress for this run: a live rich display on a terminal, else plain lines. Returns the rich
    reporter to enter around the flow (None for plain lines)."""
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

    def note(self, stage, line):
        print(f"[posttrain] {stage}: {line}", flush=True)
