"""Runs per minute through one Prefect server and 2 process workers, on loopback (README, "Concurrent
runs sharing a state dir").

Starts `prefect server start` (its own PREFECT_HOME under OUT), creates the process pool
`posttrain-process`, deploys `post-train/r1-smoke` from deployments/prefect.yaml, starts 2 workers
(`prefect worker start --limit L`, PREFECT_WORKER_QUERY_SECONDS=1), then, per batch, creates N flow
runs at once through the server's API and times from the first creation to the last run's end:

* distinct: every run gets its own `task.seed` (its own problems, so its own cache keys): every run
  trains every stage, the throughput of real work;
* identical: the same parameters on one state dir: one run computes each stage, the others wait for
  it and take cache hits (tasks/locks.py).

Every run must complete; each batch prints runs, wall seconds, runs per minute and each run's own
wall time (flow run start to end, from the server).

    python -m benchmarks.pool_throughput [--runs 4] [--limit 2] [--out DIR] [--only distinct|identical]
                                         [--set KEY=VALUE ...]   (added to every run's overrides)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FINAL = ("COMPLETED", "FAILED", "CRASHED", "CANCELLED")


def prefect_api(api: str, method: str, path: str, body: dict | None = None):
    """One call to the Prefect server's REST API; a 503 (its database busy under load) or 429 is
    made again, as Prefect's own client does."""
    req = urllib.request.Request(f"{api}{path}", method=method, headers={"Content-Type": "application/json"},
                                 data=None if body is None else json.dumps(body).encode())
    for attempt in range(20):
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code not in (429, 503) or attempt == 19:
                raise
            time.sleep(1)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def _seconds(fr: dict) -> float:
    t = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (t(fr["end_time"]) - t(fr["start_time"])).total_seconds()


def batch(api: str, dep_id: str, name: str, params: list[dict]) -> dict:
    t0 = time.perf_counter()
    ids = [prefect_api(api, "POST", f"/deployments/{dep_id}/create_flow_run", {"parameters": p})["id"] for p in params]
    while True:
        runs = [prefect_api(api, "GET", f"/flow_runs/{i}") for i in ids]
        if all(r["state"]["type"] in FINAL for r in runs):
            break
        time.sleep(1)
    wall = time.perf_counter() - t0
    states = [r["state"]["type"] for r in runs]
    if states != ["COMPLETED"] * len(ids):
        raise SystemExit(f"{name}: flow runs ended {states}")
    out = {"batch": name, "runs": len(ids), "wall_s": round(wall, 1), "runs_per_min": round(60 * len(ids) / wall, 2),
           "run_wall_s": sorted(round(_seconds(r), 1) for r in runs)}
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=4)
    ap.add_argument("--limit", type=int, default=2, help="flow runs one worker runs at once")
    ap.add_argument("--out", default="/tmp/posttrain-pool-throughput")
    ap.add_argument("--only", choices=["distinct", "identical"])
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    base = dict(os.environ, PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_UI_ENABLED="false", DO_NOT_TRACK="1")
    base.pop("PREFECT_API_URL", None)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port)], env=dict(base, PREFECT_HOME=str(out / "server")),
                              stdout=open(out / "server.log", "w"), stderr=subprocess.STDOUT, start_new_session=True)
    env = dict(base, PREFECT_API_URL=api, PREFECT_HOME=str(out / "client"), POSTTRAIN_REPO=str(REPO))
    workers: list[subprocess.Popen] = []
    try:
        for _ in range(180):
            try:
                if prefect_api(api, "GET", "/health") is True:
                    break
            except OSError:
                time.sleep(1)
        prefect = lambda *a: subprocess.run([sys.executable, "-m", "prefect", *a], cwd=REPO, env=env,  # noqa: E731
                                            check=True, capture_output=True)
        prefect("work-pool", "create", "posttrain-process", "--type", "process")
        prefect("--no-prompt", "deploy", "--name", "r1-smoke", "--prefect-file", "deployments/prefect.yaml")
        dep = prefect_api(api, "GET", "/deployments/name/post-train/r1-smoke")
        workers = [subprocess.Popen([sys.executable, "-m", "prefect", "worker", "start", "--pool", "posttrain-process",
                                     "--name", f"w{w}", "--limit", str(args.limit)], cwd=out,
                                    env=dict(env, PREFECT_WORKER_QUERY_SECONDS="1"),
                                    stdout=open(out / f"worker-{w}.log", "w"), stderr=subprocess.STDOUT,
                                    start_new_session=True) for w in range(2)]
        time.sleep(5)  # both workers polling before the first batch
        results = []
        if args.only in (None, "distinct"):
            results.append(batch(api, dep["id"], "distinct", [
                {"state_dir": str(out / "distinct"), "overrides": [f"task.seed={i + 1}", *args.sets]}
                for i in range(args.runs)]))
        if args.only in (None, "identical"):
            results.append(batch(api, dep["id"], "identical", [
                {"state_dir": str(out / "identical"), "overrides": list(args.sets)} for _ in range(args.runs)]))
        return results
    finally:
        for p in [*workers, server]:
            _stop(p)


if __name__ == "__main__":
    main()
