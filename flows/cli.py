"""`posttrain` command line.

    posttrain run [RECIPE] [--smoke] [--set key=value ...] [--summary-json PATH] [--state-dir DIR]
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "recipes":
        from models.config import RECIPES_DIR, load_recipe

        for p in sorted(RECIPES_DIR.glob("*.yaml")):
            r = load_recipe(p.stem)
            print(f"{p.stem:10s} {' → '.join(r.stages):40s} {r.description}")
        return 0
    return _run(args)


def _run(args) -> int:
    from flows.state import prepare_environment

    state_dir = prepare_environment(args.state_dir, quiet=not args.verbose)
    from data_contracts.errors import ContractError
    from models.config import RecipeError, load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides, smoke=args.smoke)  # fail fast, before Prefect starts
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from flows.report import RichReporter, print_table
    from tasks.progress import set_reporter

    reporter = None if args.no_progress or not sys.stdout.isatty() else RichReporter()
    set_reporter(reporter or _PlainReporter())
    from flows.post_train import post_train

    try:
        if reporter:
            with reporter:
                summary = post_train(recipe=args.recipe or cfg.name, overrides=args.overrides, smoke=args.smoke,
                                     state_dir=str(state_dir), tracking_uri=args.tracking_uri)
        else:
            summary = post_train(recipe=args.recipe or cfg.name, overrides=args.overrides, smoke=args.smoke,
                                 state_dir=str(state_dir), tracking_uri=args.tracking_uri)
    except (ContractError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_table(summary)
    if args.summary_json:
        out = Path(args.summary_json)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        os.replace(tmp, out)
    return 0


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
