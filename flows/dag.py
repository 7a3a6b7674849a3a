"""Run a resolved recipe graph: each node once its upstream nodes are done, at most
`max_parallel` at a time.

With 1 the nodes run one by one in the graph's topological order, in the calling thread. With more,
ready nodes run in worker threads, each under a copy of the caller's context (Prefect's flow-run
context included, so a task called there is a task of the same flow run, as with Prefect's own
thread-pool task runner). The first failure stops new nodes from starting and is re-raised once the
running ones end.
"""

from __future__ import annotations

import contextvars
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Protocol


class _Node(Protocol):
    name: str
    inputs: dict[str, str]


def run_graph(nodes: list[_Node], run_node: Callable[[_Node, dict[str, Any]], Any], max_parallel: int = 1) -> dict[str, Any]:
    """{node name: run_node(node, {upstream name: its result})} for every node."""
    results: dict[str, Any] = {}

    def upstream(node) -> dict[str, Any]:
        return {src: results[src] for src in node.inputs.values()}

    if max_parallel <= 1:
        for node in nodes:
            results[node.name] = run_node(node, upstream(node))
        return results
    pending = list(nodes)
    running: dict[Future, str] = {}
    error: BaseException | None = None
    with ThreadPoolExecutor(max_workers=max_parallel, thread_name_prefix="posttrain-node") as pool:
        while pending or running:
            while error is None and len(running) < max_parallel:
                ready = next((n for n in pending if all(src in results for src in n.inputs.values())), None)
                if ready is None:
                    break
                pending.remove(ready)
                ctx = contextvars.copy_context()
                running[pool.submit(ctx.run, run_node, ready, upstream(ready))] = ready.name
            if not running:
                break
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                name = running.pop(fut)
                try:
                    results[name] = fut.result()
                except BaseException as e:  # noqa: BLE001 - re-raised below, after the running nodes end
                    error = error or e
    if error is not None:
        raise error
    return results
