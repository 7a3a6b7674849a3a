"""A test-only fault-injection hook: `POSTTRAIN_FAULT=<pattern>` makes the run SIGKILL itself at a
named point, so kill/resume tests can stop a run at an exact place instead of racing it.

Off by default (the variable unset: one dict lookup per call). A point's name is its parts joined
by ':' and matched with fnmatch against the variable, e.g.

    before-stage:filter                      the flow, once `filter` is the current stage, before it runs
    checkpoint-uncommitted:sft-*:20          the engine, step 20's checkpoint files on disk, `latest` not yet moved
    step-done:sft-*:3:1                      the engine's rank 1, step 3 done, before its checkpoint (if any)

The kill goes to the whole process group (a DeepSpeed rank, the flow process and Prefect's
ephemeral server alike), as when a scheduler or `kill -9 -PGID` kills a job: start a run that uses
it in its own session/process group.
"""

from __future__ import annotations

import fnmatch
import os
import signal

ENV = "POSTTRAIN_FAULT"


def fault_point(*parts: object) -> None:
    pattern = os.environ.get(ENV)
    if not pattern or not fnmatch.fnmatchcase(":".join(str(p) for p in parts), pattern):
        return
    try:
        os.killpg(os.getpgrp(), signal.SIGKILL)
    finally:
        os.kill(os.getpid(), signal.SIGKILL)
