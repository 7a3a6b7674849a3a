"""`posttrain` command line.

    posttrain run [RECIPE] [--smoke] [--set key=value ...] [--summary-json PATH] [--state-dir DIR]
    posttrain resume RUN [--force]         rerun a failed/crashed run with its original parameters, in the
                                           state dir that holds its record (--state-dir: a moved copy)
    posttrain runs [--json] [--limit N]    the run records of the state dir
    posttrain lineage MODEL_OR_RUN [--json]  walk a model back to its base checkpoint, check digests
    posttrain serve [--only NAME] [--interval S]  serve deployments/prefect.yaml from one process
    posttrain recipes                      list the shipped recipes
    posttrain graph [RECIPE] [--state-dir DIR]  the recipe's resolved DAG; with a state dir, what is cached
    posttrain services up|status|down      a team's Prefect and MLflow servers on PostgreSQL (flows/services.py)
    posttrain node-agent (--workdir DIR | --state-dir DIR [--stage NAME] | --rdzv-endpoint … --spec PATH)
                                           one other node of a multi-node training stage (docs/multinode.md)

Heavy stacks (torch, Prefect, MLflow) are imported only by the commands that need them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.execute import execute_flow, install_reporter
from flows.services import services_command, services_parser


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
    graph = sub.add_parser("graph", help="print a recipe's resolved DAG (nodes, kinds, edges; cached nodes of a state dir)")
    graph.add_argument("recipe", nargs="?", default=None, help="shipped recipe name or YAML path (default: r1)")
    graph.add_argument("--smoke", action="store_true", help="the recipe's smoke size")
    graph.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, as for `run`")
    graph.add_argument("--json", action="store_true", help="print the graph as JSON")
    graph.add_argument("--state-dir", default=None, help="show which nodes this state dir holds as cached")
    graph.add_argument("--verbose", action="store_true", help="show Prefect's logs")
    resume = sub.add_parser("resume", help="rerun a failed or crashed run with its original parameters")
    resume.add_argument("run_id", metavar="RUN", help="Prefect flow-run id or MLflow parent run id (see `posttrain runs`)")
    resume.add_argument("--force", action="store_true", help="resume even a COMPLETED run")
    resume.add_argument("--summary-json", default=None, metavar="PATH", help="write the run summary as JSON")
    resume.add_argument("--no-progress", action="store_true", help="no live progress display")
    resume.add_argument("--tracking-uri", default=None,
                        help="track in this MLflow store instead of the recorded one (a tracking server "
                             "that moved)")
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
    sync = sub.add_parser("sync", help="send the tracking calls that runs queued while MLflow was down to the store")
    sync.add_argument("--state-dir", default=None,
                      help="project state dir (default: $POSTTRAIN_HOME or ./.posttrain)")
    sync.add_argument("--tracking-uri", default=None,
                      help="send them here instead of the store each run was queued for (a moved server)")
    serve = sub.add_parser("serve", help="serve the deployments of deployments/prefect.yaml from this process")
    serve.add_argument("--only", action="append", default=None, metavar="NAME", help="serve only this one (repeatable)")
    serve.add_argument("--interval", type=float, default=None, metavar="SECONDS",
                       help="run every served deployment on this interval instead of its schedule "
                            "(r1-nightly's cron; on-demand ones get one too): tests, demos")
    serve.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1: stages share the CPU)")
    _add_common(serve)
    pools = sub.add_parser("pools", help="work pools that run recipe stages (a node's work_pool): deploy, list")
    pools_sub = pools.add_subparsers(dest="pools_command", required=True)
    pdeploy = pools_sub.add_parser(
        "deploy", help="create each process work pool if missing and (re)create its posttrain-stage deployment",
        description="For each POOL: create the process work pool when it does not exist (unless --no-create), then "
                    "create or update the deployment posttrain-stage/POOL of the stage flow (flows/pools.py), run "
                    "from --repo. Needs PREFECT_API_URL. Then start a worker: prefect worker start --pool POOL")
    pdeploy.add_argument("pool", nargs="+", metavar="POOL")
    pdeploy.add_argument("--repo", default=None, metavar="DIR",
                         help="the checkout the pool's workers run the stage from (default: this one)")
    pdeploy.add_argument("--no-create", action="store_true", help="fail when a pool does not exist")
    plist = pools_sub.add_parser("list", help="the pools a recipe places nodes on: deployment, live workers")
    plist.add_argument("recipe", nargs="?", default=None, help="shipped recipe name or YAML path (default: r1)")
    plist.add_argument("--smoke", action="store_true", help="the recipe's smoke size")
    plist.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, as for `run` (e.g. --set sft.work_pool=gpu)")
    agent = sub.add_parser(
        "node-agent",
        help="join a multi-node training stage as one of its other nodes (node 0 prints this command)",
        description="Start this node's torchrun agent for a multi-node training stage (nnodes > 1). Either the "
                    "exact flags node 0 printed, or where node 0 announced its rendezvous: --workdir (the stage's "
                    "work dir) or --state-dir (the newest announcement there, of --stage if given). Exits with "
                    "torchrun's status: non-zero when a node never arrived, a rank failed or a node left.",
    )
    agent.add_argument("--workdir", default=None, help="the stage's work dir, holding node 0's rendezvous.json")
    agent.add_argument("--state-dir", default=None, help="shared state dir: join the newest announced rendezvous")
    agent.add_argument("--stage", default=None, help="with --state-dir: only a rendezvous of this stage (node name)")
    agent.add_argument("--wait", type=float, default=600.0, metavar="SECONDS",
                       help="how long to wait for node 0's announcement (default 600)")
    agent.add_argument("--follow", action="store_true",
                       help="with --workdir/--state-dir: after a stage (finished or failed), wait for the next "
                            "rendezvous (the run's next multi-node stage, or a resumed one) and join it too; once "
                            "none appears for --wait seconds, exit with the last stage's status")
    agent.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="node 0's rendezvous store")
    agent.add_argument("--rdzv-id", default=None, help="the rendezvous id node 0 printed")
    agent.add_argument("--nnodes", type=int, default=None, help="nodes in the stage")
    agent.add_argument("--nproc-per-node", type=int, default=None, help="ranks on each node")
    agent.add_argument("--rdzv-timeout-s", type=float, default=None, help="join timeout in seconds")
    agent.add_argument("--spec", default=None, metavar="PATH", help="the stage's spec.json (in its work dir)")
    services_parser(sub)
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
            shape = ' → '.join(r.stages) if r.nodes is None else f"graph of {len(r.stages)} nodes"
            print(f"{p.stem:12s} {shape:44s} {r.description}")
        return 0
    if args.command in ("runs", "lineage"):
        try:
            return {"runs": _runs, "lineage": _lineage}[args.command](args)
        except BrokenPipeError:  # `posttrain runs --json | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
            return 0
    handler = {"resume": _resume, "serve": _serve, "graph": _graph, "sync": _sync,
               "node-agent": _node_agent, "services": services_command, "pools": _pools}.get(args.command, _run)
    return handler(args)


def _summary_json_problem(path: str | None) -> str | None:
    """Why `--summary-json PATH` could not be written after the run (checked before it starts), or None."""
    if not path:
        return None
    out = Path(path).expanduser().resolve()
    fix = "pass a file path to --summary-json"
    if out.is_dir():
        return f"--summary-json {out} is a directory; {fix} (e.g. {out / 'summary.json'})"
    above = next((p for p in out.parents if p.exists()), None)
    if above is not None and not above.is_dir():
        return f"--summary-json {out}: {above} is a file, not a directory; {fix}"
    if (above is not None and not os.access(above, os.W_OK | os.X_OK)) or (out.exists() and not os.access(out, os.W_OK)):
        return f"--summary-json {out}: not writable by this user; {fix} in a writable directory"
    return None


def _checked_outputs(state_dir: str | None, summary_json: str | None) -> bool:
    """The state dir and the summary file are usable, else one `error:` line (before Prefect or MLflow start)."""
    problem = _summary_json_problem(summary_json)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return False
    return _checked_state_dir(state_dir)


def _checked_state_dir(state_dir: str | None) -> bool:
    """The state dir is usable, else one `error:` line (before Prefect or MLflow start in it)."""
    from flows.state import StateDirError, check_state_dir

    try:
        check_state_dir(state_dir)
    except StateDirError as e:
        print(f"error: {e}", file=sys.stderr)
        return False
    return True


def _run(args) -> int:
    from flows import interrupt
    from flows.state import prepare_environment

    interrupt.install(args.state_dir)

    if not _checked_outputs(args.state_dir, args.summary_json):
        return 2
    state_dir = prepare_environment(args.state_dir, quiet=not args.verbose)
    from models.config import RecipeError, load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides, smoke=args.smoke)  # fail fast, before Prefect starts
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if cfg.work_pools and not os.environ.get("PREFECT_API_URL"):
        from flows.pools import PoolError, check_pools

        try:
            check_pools(cfg)  # fails fast: pools live on a server
        except PoolError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    reporter = install_reporter(args.no_progress)
    params = dict(recipe=args.recipe or cfg.name, overrides=args.overrides, smoke=args.smoke,
                  state_dir=str(state_dir), tracking_uri=args.tracking_uri)
    return execute_flow(params, args.summary_json, reporter, verbose=args.verbose)


def _resume(args) -> int:
    from flows import interrupt, runs
    from flows.state import prepare_environment

    interrupt.install(args.state_dir)

    if not _checked_outputs(args.state_dir, args.summary_json):
        return 2
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
    # The state dir that holds the record wins over the one recorded in it: a state dir copied to a
    # bigger disk (the disk-full advice) resumes there, and never writes to the old one again.
    tracking_uri = args.tracking_uri or original.get("tracking_uri")
    old_store = original.get("state_dir") and f"sqlite:///{Path(original['state_dir']) / 'mlflow.db'}"
    if not args.tracking_uri and tracking_uri == old_store:
        tracking_uri = None  # the old dir's own store, given explicitly: the new dir's own store now
    params = dict(recipe=original["recipe"], overrides=list(original.get("overrides") or []),
                  smoke=bool(original.get("smoke")), state_dir=str(state_dir),
                  tracking_uri=tracking_uri, resumed_from=rec["flow_run_id"])
    stage = f" (failed at {rec['failed_stage']})" if rec.get("failed_stage") else ""
    print(f"[posttrain] resuming {rec['status']} run {rec['flow_run_id']}{stage}: recipe {params['recipe']}"
          f"{' --smoke' if params['smoke'] else ''} {' '.join('--set ' + o for o in params['overrides'])}", flush=True)
    return execute_flow(params, args.summary_json, install_reporter(args.no_progress), verbose=args.verbose)


def _missing_state_dir(state_dir: str | None) -> bool:
    """A read-only command names a state dir that is not there (one `error:` line; nothing is created)."""
    from flows.state import resolve_state_dir

    root = resolve_state_dir(state_dir)
    if root.is_dir():
        return False
    what = "is not a directory" if root.exists() else "does not exist"
    print(f"error: state dir {root} {what}; pass the one your runs used with --state-dir (or POSTTRAIN_HOME)",
          file=sys.stderr)
    return True


RUN_KEYS = ("flow_run_id", "mlflow_parent_run_id", "recipe", "status", "failed_stage", "started")


def _runs(args) -> int:
    from flows import runs
    from flows.state import resolve_state_dir

    if args.limit < 0:
        print(f"error: --limit {args.limit}: give a count of runs, 0 or more", file=sys.stderr)
        return 2
    if _missing_state_dir(args.state_dir):
        return 2
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


def _sync(args) -> int:
    """Replay the state dir's tracking journals into MLflow; the run records get the real run ids."""
    from flows import runs
    from flows.state import resolve_state_dir
    from tasks.common import replay_queued, state_paths
    from tasks.tracking_queue import IdMap, pending_journals

    if _missing_state_dir(args.state_dir):
        return 2
    state_dir = resolve_state_dir(args.state_dir)
    queue = state_paths(state_dir)["tracking_queue"]
    waiting = len(pending_journals(queue))
    try:
        report = replay_queued(state_dir, tracking_uri=args.tracking_uri)
    except Exception as e:  # noqa: BLE001 - the store still does not answer: say so in one line
        runs.translate_run_ids(state_dir, IdMap(queue).ids)  # what was replayed before it failed
        print(f"error: the tracking store did not take the queue ({type(e).__name__}: {str(e)[:300]}); "
              f"{len(pending_journals(queue))} journal(s) stay queued in {queue}", file=sys.stderr)
        return 1
    if report is None:
        print(f"nothing queued in {queue}")
        return 0
    runs.translate_run_ids(state_dir, IdMap(queue).ids)
    print(f"replayed {report['calls']} calls ({report['runs']} runs) of {report['journals']} journal(s) into "
          f"{', '.join(report['uris']) or '-'}")
    held = waiting - report["journals"]
    if held:
        print(f"{held} journal(s) left queued: a run that is still going holds them (sync again when it ends)")
    for why in report["skipped"]:
        print(f"skipped: {why}")
    return 0


def _lineage(args) -> int:
    from flows.lineage import LineageError, format_chain, lineage
    from flows.state import prepare_environment, resolve_state_dir
    from tasks.common import default_tracking_uri

    state_dir = resolve_state_dir(args.state_dir)
    if not args.tracking_uri:  # the state dir's own store: it must be there (a reader never creates one)
        if _missing_state_dir(args.state_dir):
            return 2
        if not (state_dir / "mlflow.db").is_file():
            print(f"error: no MLflow store {state_dir / 'mlflow.db'}: no run has been tracked in this state dir "
                  "(pass the run's --state-dir, or --tracking-uri)", file=sys.stderr)
            return 2
    if state_dir.is_dir():
        prepare_environment(args.state_dir, quiet=not args.verbose)
    try:
        result = lineage(args.target, args.tracking_uri or default_tracking_uri(state_dir),
                         str(state_dir) if state_dir.is_dir() else None)
    except LineageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if args.json else format_chain(result))
    for p in result["problems"]:
        print(f"lineage broken: {p}", file=sys.stderr)
    return 1 if result["problems"] else 0


def _graph(args) -> int:
    from models.config import RecipeError, load_recipe

    try:
        cfg = load_recipe(args.recipe, args.overrides, smoke=args.smoke)
    except RecipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    state_dir = None
    if args.state_dir is not None:
        if _missing_state_dir(args.state_dir):
            return 2
        from flows.state import prepare_environment

        state_dir = prepare_environment(args.state_dir, quiet=not args.verbose)
    from flows.graph import graph_json, graph_text

    print(json.dumps(graph_json(cfg, state_dir), indent=2) if args.json else graph_text(cfg, state_dir))
    return 0


def _node_agent(args) -> int:
    from models.training.launch import MultiNodeError, find_rendezvous, run_node_agent

    explicit = {"endpoint": args.rdzv_endpoint, "id": args.rdzv_id, "nnodes": args.nnodes,
                "nproc_per_node": args.nproc_per_node, "timeout_s": args.rdzv_timeout_s, "spec": args.spec}
    if args.follow and not (args.workdir or args.state_dir):
        print("error: node-agent --follow needs --workdir or --state-dir", file=sys.stderr)
        return 2
    joined: set[str] = set()
    rc = 0
    try:
        if args.workdir or args.state_dir:
            while True:
                try:
                    rdzv = find_rendezvous(workdir=args.workdir, state_dir=args.state_dir, stage=args.stage,
                                           wait_s=args.wait, exclude=joined)
                except MultiNodeError:
                    if joined:  # --follow: no further stage within --wait
                        print(f"[posttrain] node agent: no new rendezvous for {args.wait:g}s after {len(joined)} "
                              "stage(s); done", file=sys.stderr)
                        return rc
                    raise
                rdzv.update({k: v for k, v in explicit.items() if v is not None})  # flags override the file
                rc = run_node_agent(rdzv)
                if not args.follow:
                    return rc
                joined.add(rdzv["id"])  # a failed stage's rerun announces a new id: join that too
        else:
            missing = [f"--{k}" for k, v in (("rdzv-endpoint", args.rdzv_endpoint), ("rdzv-id", args.rdzv_id),
                                             ("nnodes", args.nnodes), ("nproc-per-node", args.nproc_per_node),
                                             ("spec", args.spec)) if v is None]
            if missing:
                print(f"error: node-agent needs --workdir, --state-dir, or all of: {', '.join(missing)}", file=sys.stderr)
                return 2
            rdzv = dict(explicit, timeout_s=args.rdzv_timeout_s or 600.0)
    except MultiNodeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return run_node_agent(rdzv)


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


def _pools(args) -> int:
    os.environ.setdefault("DO_NOT_TRACK", "1")
    from flows.pools import PoolError, check_pools, deploy

    try:
        if args.pools_command == "deploy":
            for pool in args.pool:
                d = deploy(pool, repo=args.repo, create_pool=not args.no_create)
                made = "created work pool" if d["pool_created"] else "work pool"
                print(f"{made} {pool} (process); deployment {d['deployment']} runs {d['repo']}")
            print("start a worker for each: prefect worker start --pool POOL")
            return 0
        from models.config import RecipeError, load_recipe

        try:
            cfg = load_recipe(args.recipe, args.overrides, smoke=args.smoke)
        except RecipeError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        placed = {n.name: cfg.work_pool(n.name) for n in cfg.graph()}
        live = check_pools(cfg)
        for node, pool in placed.items():
            print(f"{node:12s} {pool or '(in the flow process)'}" + (f"  live workers: {live[pool]}" if pool else ""))
        return 0
    except PoolError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
