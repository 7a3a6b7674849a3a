"""The stage registry and the recipe graph.

`KINDS` is the one table of stage kinds: for each kind its Prefect task, its config class, its input
ports (name → the type of artifact it takes), its output type, the code its cache key covers, the
datasets it reads from its own settings, and (training kinds) its recipe function. Adding a stage
kind is one entry here (plus its task and config). Tasks and data resolvers are named by
"module:function" strings: this module stays below `tasks/` and imports neither Prefect nor MLflow.

A recipe resolves into `Node`s — a unique name, a kind, the upstream node feeding each port, and the
validated settings — in a topological order (`resolve_graph`). Errors name the node: an unknown kind,
a duplicate name, a port fed by an unknown node or by the wrong type of artifact, a cycle.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pydantic import BaseModel, ValidationError

# What a node makes: a model to start from or evaluate, rejection samples, an SFT dataset, a reward model.
CHECKPOINT, SAMPLES, DATASET, REWARD_MODEL = "checkpoint", "samples", "dataset", "reward_model"


@dataclass(frozen=True)
class Port:
    """An input of a kind: the artifact type it takes, and the name the task (and cache key) sees."""

    type: str
    input: str
    required: bool = True


@dataclass(frozen=True)
class StageKind:
    config: str  # "module:Class" of the settings (models.config defines fetch's and sft's)
    output: str
    task: str  # "module:function" of the Prefect task
    code: tuple[str, ...]  # the modules whose source versions the cache key
    ports: dict[str, Port] = field(default_factory=dict)
    recipe: str | None = None  # training kinds: the recipe function the train task launches
    data: str | None = None  # "module:function"(settings, task, datasets dir) -> {input name: ArtifactRef}
    takes_task_config: bool = False  # the task also gets the built-in task's settings (fetch pretrains on it)
    rl_curve: bool = False  # its per-step metrics go in the report's RL panel

    def config_class(self) -> type[BaseModel]:
        import importlib

        mod, _, name = self.config.partition(":")
        return getattr(importlib.import_module(mod), name)


FROM = Port(CHECKPOINT, "model")
_TRAIN = "tasks.train:train_stage"
KINDS: dict[str, StageKind] = {
    "fetch": StageKind("models.config:FetchConfig", CHECKPOINT, "tasks.fetch:fetch_base",
                       ("tasks.fetch", "models.recipes.pretrain"), data="tasks.inputs:fetch_source",
                       takes_task_config=True),
    "sft": StageKind("models.config:SFTConfig", CHECKPOINT, _TRAIN, ("tasks.train", "models.recipes.sft"),
                     {"from": FROM}, recipe="models.recipes.sft:train_sft", data="tasks.inputs:sft_dataset"),
    "reward_model": StageKind("models.recipes.preference_config:RewardModelConfig", REWARD_MODEL, _TRAIN,
                              ("tasks.train", "models.recipes.reward_model"), {"from": FROM},
                              recipe="models.recipes.reward_model:train_reward_model", data="tasks.inputs:preferences"),
    "dpo": StageKind("models.recipes.preference_config:DPOConfig", CHECKPOINT, _TRAIN, ("tasks.train", "models.recipes.dpo"),
                     {"from": FROM}, recipe="models.recipes.dpo:train_dpo", data="tasks.inputs:preferences"),
    "grpo": StageKind("models.recipes.rl_config:GRPOConfig", CHECKPOINT, _TRAIN, ("tasks.train", "models.recipes.grpo"),
                      {"from": FROM}, recipe="models.recipes.grpo:train_grpo", data="tasks.inputs:prompts",
                      rl_curve=True),
    "ppo": StageKind("models.recipes.ppo_config:PPOConfig", CHECKPOINT, _TRAIN, ("tasks.train", "models.recipes.ppo"),
                     {"from": FROM, "reward_model": Port(REWARD_MODEL, "reward_model", required=False)},
                     recipe="models.recipes.ppo:train_ppo", data="tasks.inputs:prompts", rl_curve=True),
    "sample": StageKind("models.recipes.sample_filter_config:SampleConfig", SAMPLES, "tasks.samples:sample_stage",
                        ("tasks.samples",), {"from": FROM}, data="tasks.inputs:prompts"),
    "filter": StageKind("models.recipes.sample_filter_config:FilterConfig", DATASET, "tasks.samples:filter_stage",
                        ("tasks.samples",), {"samples": Port(SAMPLES, "samples")}),
    # SFT on a filter's kept samples
    "refine": StageKind("models.config:SFTConfig", CHECKPOINT, _TRAIN, ("tasks.train", "models.recipes.sft"),
                        {"from": FROM, "samples": Port(DATASET, "dataset")}, recipe="models.recipes.sft:train_sft"),
}

# kind -> output type (what `posttrain lineage` and the list form ask)
STAGE_KINDS = {kind: k.output for kind, k in KINDS.items()}

NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


@dataclass
class Node:
    """One stage of a recipe: `inputs` maps each fed port to its upstream node's name."""

    name: str
    kind: str
    inputs: dict[str, str]
    config: BaseModel

    @property
    def spec(self) -> StageKind:
        return KINDS[self.kind]


class GraphError(ValueError):
    """A recipe graph that cannot run; the message names the node."""


def parse_node_config(name: str, kind: str, raw: dict | None) -> BaseModel:
    """A node's settings, validated by its kind's config class; errors name `<node>.<field>`."""
    try:
        return KINDS[kind].config_class().model_validate(raw or {})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise GraphError(f"node {name!r}: config.{loc}: {msg}" if loc else f"node {name!r}: {msg}") from None


def nodes_from_list(raw: list) -> list[dict]:
    """Each entry `{name, kind, from?, <port>: node, config?}` checked for shape (not yet for edges)."""
    out, seen = [], set()
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise GraphError(f"nodes[{i}]: a node is a mapping with name, kind, from/ports and config")
        name = item.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise GraphError(f"nodes[{i}]: name {name!r}: a node needs a name of letters, digits, '_' or '-'")
        if name in seen:
            raise GraphError(f"node {name!r}: duplicate name (nodes[{i}]); every node needs its own name")
        seen.add(name)
        kind = item.get("kind")
        if kind not in KINDS:
            raise GraphError(f"node {name!r}: unknown kind {kind!r} (known: {', '.join(KINDS)})")
        ports = KINDS[kind].ports
        extra = sorted(set(item) - {"name", "kind", "config", "work_pool"} - set(ports))
        if extra:
            raise GraphError(f"node {name!r}: {kind} has no port {extra[0]!r} "
                             f"(ports: {', '.join(ports) or 'none'})")
        inputs = {p: item[p] for p in ports if item.get(p) is not None}
        for p, src in inputs.items():
            if not isinstance(src, str):
                raise GraphError(f"node {name!r}: {p}: give the name of one upstream node, not {src!r}")
        out.append({"name": name, "kind": kind, "inputs": inputs, "config": item.get("config")})
    return out


def resolve_graph(entries: list[dict], configs: dict[str, BaseModel]) -> list[Node]:
    """Nodes in a topological order (declaration order among the ready ones); checks every edge."""
    by_name = {e["name"]: e for e in entries}
    for e in entries:
        spec = KINDS[e["kind"]]
        for port, p in spec.ports.items():
            src = e["inputs"].get(port)
            if src is None:
                if p.required:
                    raise GraphError(f"node {e['name']!r}: {e['kind']} needs '{port}:' (a {p.type} node)")
                continue
            if src not in by_name:
                raise GraphError(f"node {e['name']!r}: {port}: unknown node {src!r} (nodes: {', '.join(by_name)})")
            made = KINDS[by_name[src]["kind"]].output
            if made != p.type:
                raise GraphError(f"node {e['name']!r}: port '{port}' takes a {p.type}, but {src!r} "
                                 f"({by_name[src]['kind']}) makes a {made}")
    order: list[Node] = []
    placed: set[str] = set()
    pending = list(entries)
    while pending:
        ready = next((e for e in pending if set(e["inputs"].values()) <= placed), None)
        if ready is None:
            raise GraphError(f"node {_cycle(pending)!r}: is in a cycle ({_cycle_path(pending)})")
        pending.remove(ready)
        placed.add(ready["name"])
        order.append(Node(ready["name"], ready["kind"], dict(ready["inputs"]), configs[ready["name"]]))
    return order


def _cycle_path(pending: list[dict]) -> str:
    """One cycle among the unplaced nodes, as `a → b → a`."""
    by_name = {e["name"]: e for e in pending}
    node, path = pending[0]["name"], []
    while node not in path:
        path.append(node)
        node = next(s for s in by_name[node]["inputs"].values() if s in by_name)
    path = path[path.index(node):] + [node]
    return " → ".join(reversed(path))


def _cycle(pending: list[dict]) -> str:
    return _cycle_path(pending).split(" → ")[0]


def nodes_from_stages(stages: list[str]) -> list[dict]:
    """The list form: each stage is a node named by its kind; `from` is the newest checkpoint before
    it, and a data port takes the newest node of the type it wants."""
    out, newest = [], {}
    for stage in stages:
        spec = KINDS[stage]
        inputs = {}
        for port, p in spec.ports.items():
            if p.type in newest:
                inputs[port] = newest[p.type]
        out.append({"name": stage, "kind": stage, "inputs": inputs, "config": None})
        newest[spec.output] = stage
    return out


def describe(nodes: list[Node], cached: dict[str, bool] | None = None) -> str:
    """The resolved DAG as text: one line per node (kind, inputs by port), then the edges."""
    lines = []
    w = max((len(n.name) for n in nodes), default=4)
    for n in nodes:
        ins = ", ".join(f"{p}: {src}" for p, src in n.inputs.items()) or "-"
        state = "" if cached is None else ("  [cached]" if cached.get(n.name) else "  [to run]")
        lines.append(f"{n.name:<{w}}  {n.kind:<12} {'(' + n.spec.output + ')':<14} ← {ins}{state}")
    lines.append("edges:")
    lines += [f"  {src} → {n.name} ({p})" for n in nodes for p, src in n.inputs.items()]
    return "\n".join(lines)
