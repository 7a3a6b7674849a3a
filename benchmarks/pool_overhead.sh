#!/bin/bash
# The orchestration overhead of a stage dispatched to a work pool against the same stage in-process
# (README "Stages on work pools"). On loopback: r1 at smoke size (shrunk with --set), once in one
# process (state dir a/), then with sample, filter and refine on a process pool "cpu" with one worker
# (state dir b/), then each again in its own state dir (every stage a cache hit). Prints, per stage,
# the wall time in one process, inside the stage flow on the worker, and as the recipe flow waited.
#   usage: benchmarks/pool_overhead.sh [OUT_DIR]   (PY: the python with posttrain installed)
set -e
REPO=$(cd "$(dirname "$0")/.." && pwd)
B=${1:-/tmp/posttrain-pool-overhead}; rm -rf "$B"; mkdir -p "$B"; cd "$REPO"
PY=${PY:-python}
export PYTHONPATH=$REPO DO_NOT_TRACK=1 PREFECT_SERVER_ANALYTICS_ENABLED=false PREFECT_UI_ENABLED=false
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$REPO/.posttrain/torch_extensions}
SETS="--set fetch.pretrain.max_steps=10 --set sft.max_steps=10 --set refine.max_steps=4 --set refine.save_every=2 --set task.pretrain_docs=1000 --set sample.num_prompts=8 --set evaluate.num_problems=8 --set evaluate.k=2"
POOLS="--set sample.work_pool=cpu --set filter.work_pool=cpu --set refine.work_pool=cpu"
PREFECT_HOME=$B/server setsid $PY -m prefect server start --host 127.0.0.1 --port 4299 > $B/server.log 2>&1 &
SERVER=$!
trap 'kill -TERM -- -$SERVER ${WORKER:+-$WORKER} 2>/dev/null; sleep 15; kill -KILL -- -$SERVER ${WORKER:+-$WORKER} 2>/dev/null || true' EXIT
/usr/bin/time -f "in-process run %e s" $PY -m flows.cli run --smoke --no-progress $SETS --state-dir $B/a --summary-json $B/a.json > $B/a.log 2>&1
until curl -sf http://127.0.0.1:4299/api/health >/dev/null; do sleep 1; done
export PREFECT_API_URL=http://127.0.0.1:4299/api PREFECT_HOME=$B/client
$PY -m flows.cli pools deploy cpu
(cd $B && PREFECT_WORKER_QUERY_SECONDS=1 exec setsid $PY -m prefect worker start --pool cpu > $B/worker.log 2>&1) &
WORKER=$!
sleep 5
/usr/bin/time -f "pool run %e s" $PY -m flows.cli run --smoke --no-progress $SETS $POOLS --state-dir $B/b --summary-json $B/b.json > $B/b.log 2>&1
/usr/bin/time -f "pool run, cached %e s" $PY -m flows.cli run --smoke --no-progress $SETS $POOLS --state-dir $B/b --summary-json $B/b2.json > $B/b2.log 2>&1
/usr/bin/time -f "in-process run, cached %e s" $PY -m flows.cli run --smoke --no-progress $SETS --state-dir $B/a --summary-json $B/a2.json > $B/a2.log 2>&1
tail -qn1 $B/a.log $B/b.log $B/b2.log $B/a2.log
cd "$B" && $PY - <<'PY'
import json
for one, pool in (("a.json", "b.json"), ("a2.json", "b2.json")):
    a, b = (json.load(open(f)) for f in (one, pool))
    ra = {r["stage"]: r for r in a["stages"]}
    print(f"{one} vs {pool}: stage, in one process | in the stage flow | as the recipe flow waited (s)")
    for r in b["stages"]:
        if r.get("work_pool"):
            x = ra[r["stage"]]
            assert x["output"]["digest"] == r["output"]["digest"], r["stage"]
            print(f"  {r['stage']:7s} {x['wall_seconds']:7.2f} | {r['wall_seconds']:7.2f} | {r['dispatch_seconds']:7.2f}"
                  f"  (+{r['dispatch_seconds'] - r['wall_seconds']:.1f} s)")
PY
