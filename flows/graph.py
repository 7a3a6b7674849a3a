"""`posttrain graph`: the resolved DAG of a recipe (nodes, kinds, edges) and, for a state dir, which
nodes a run would take from the cache.

A node is cached when the state dir holds a finished result under the key the flow would compute
for it (same kind, settings, input digests and code), and its output is still on disk; a node below
one that is not cached cannot be known yet, so it shows as to run. Only the built-in datasets a node
reads are written (into the state dir's datasets/, as a run would); no stage runs.
"""

from __future__ import annotations

from pathlib import Path

from models.config import RecipeConfig
from models.stages import describe


def _stored_result(results_dir: Path, key: str):
    """The StageResult Prefect persisted under a cache key, or None."""
    path = results_dir / key
    if not path.is_file():
        return None
    try:
        from prefect._internal.result_records import ResultRecord

        return ResultRecord.deserialize(path.read_bytes()).result
    except Exception:  # noqa: BLE001 - an unreadable record is a miss, as it is for the flow
        return None


def cached_nodes(cfg: RecipeConfig, state_dir: str | Path) -> dict[str, bool]:
    from flows.post_train import _node_data, plan_node
    from tasks.common import state_paths

    paths = state_paths(state_dir)
    data = _node_data(cfg, paths)
    outputs, cached = {}, {}
    for node in cfg.graph():
        if not all(src in outputs for src in node.inputs.values()):
            cached[node.name] = False
            continue
        key, *_ = plan_node(node, cfg, data[node.name], {src: outputs[src] for src in node.inputs.values()})
        res = _stored_result(paths["results"], key)
        cached[node.name] = bool(res is not None and res.output.verify())
        if cached[node.name]:
            outputs[node.name] = res.output
    return cached


def graph_text(cfg: RecipeConfig, state_dir: str | Path | None = None) -> str:
    cached = cached_nodes(cfg, state_dir) if state_dir is not None else None
    head = f"recipe {cfg.name}: {len(cfg.graph())} nodes, final {cfg.final_node().name}"
    if cached is not None:
        head += f"; {sum(cached.values())} cached in {Path(state_dir).resolve()}"
    return head + "\n" + describe(cfg.graph(), cached)


def graph_json(cfg: RecipeConfig, state_dir: str | Path | None = None) -> dict:
    cached = cached_nodes(cfg, state_dir) if state_dir is not None else {}
    return {"recipe": cfg.name, "final": cfg.final_node().name,
            "nodes": [{"name": n.name, "kind": n.kind, "output": n.spec.output, "inputs": n.inputs,
                       **({"cached": cached[n.name]} if state_dir is not None else {})} for n in cfg.graph()],
            "edges": [{"from": src, "to": n.name, "port": p} for n in cfg.graph() for p, src in n.inputs.items()]}
