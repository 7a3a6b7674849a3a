"""Typed recipe configs: a recipe YAML becomes one validated `RecipeConfig`.

Every stage has a section named after it (`fetch`, `sft`, `evaluate`, ...). Every field carries a
description and a default taken from the prototype measurements in DESIGN.md or from the peer it
follows (TRL names where users know them). Unknown keys are errors that name the key's path.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from models.ppo_config import PPOConfig
from models.pref_config import DPOConfig, RewardModelConfig
from models.rl_config import GRPOConfig
from models.sample_filter_config import FilterConfig, SampleConfig
from models.train_config import Strict, TrainConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = REPO_ROOT / "deployments" / "recipes"
DEEPSPEED_DIR = REPO_ROOT / "deployments" / "deepspeed"
DEFAULT_RECIPE = "r1"


class TaskConfig(Strict):
    """The built-in verifiable reasoning task (arithmetic chains, see models/builtin_task.py)."""

    seed: int = Field(0, description="seed of the problem generator; fixes the train/test split")
    n_train: int = Field(20000, ge=1, description="training problems (SFT, RL prompts)")
    n_test: int = Field(256, ge=1, description="held-out problems; never seen in any training data")
    min_operands: int = Field(3, ge=2, description="fewest single-digit operands in a chain")
    max_operands: int = Field(6, ge=2, description="most single-digit operands in a chain")
    prompt_style: Literal["qa", "plain"] = Field(
        "qa", description="'qa': 'Q: 4-0+2\\nA:' (SFT/R1); 'plain': '4-0+2=' as in the pretraining corpus (R1-Zero)")
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


class PretrainConfig(TrainConfig):
    """Stage 1 of the built-in model: causal-LM pretraining on the built-in corpus."""

    lr: float = Field(2e-3, gt=0, description="peak learning rate; a 1.8M model takes a high one")
    max_steps: int = Field(500, ge=1, description="optimizer steps (~2 min on 2 cores)")
    batch_size: int = Field(32, ge=1, description="packed sequences per step")
    micro_batch_size: int = Field(32, ge=1, description="packed sequences per rank per micro-step")
    seq_len: int = Field(128, ge=8, description="packed sequence length in tokens")
    hidden_size: int = Field(192, ge=8, description="model width (prototype: 192)")
    num_layers: int = Field(4, ge=1, description="transformer blocks")
    num_heads: int = Field(4, ge=1, description="attention heads")
    intermediate_size: int = Field(512, ge=8, description="MLP width")
    max_position_embeddings: int = Field(256, ge=16, description="longest sequence the model takes")


class FetchConfig(Strict):
    uri: str = Field(
        "builtin:tiny",
        description="base checkpoint: 'builtin:tiny' (pretrained here), a local HF dir, "
        "'hf://org/name@revision' (huggingface_hub, offline cache honoured), or 'models:/name/version'",
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


class TrackingConfig(Strict):
    experiment: str = Field("posttrain", description="MLflow experiment name")
    register_model: str | None = Field(None, description="register the final model under this name")


class RecipeConfig(Strict):
    name: str = Field(description="recipe name")
    description: str = Field("", description="what this recipe does")
    stages: list[str] = Field(description="stage sections to run, in order")
    retries: int = Field(0, ge=0, description="Prefect retries per stage")
    task: TaskConfig = Field(default_factory=TaskConfig)
    fetch: FetchConfig = Field(default_factory=FetchConfig)
    sft: SFTConfig | None = None
    reward_model: RewardModelConfig | None = None
    dpo: DPOConfig | None = None
    grpo: GRPOConfig | None = None
    ppo: PPOConfig | None = None
    sample: SampleConfig | None = Field(None, description="rejection sampling: N scored candidates per prompt")
    filter: FilterConfig | None = Field(None, description="which samples become refine data (models/filters.py)")
    refine: SFTConfig | None = Field(None, description="SFT on the filtered samples (dataset: samples)")
    evaluate: EvalConfig = Field(default_factory=EvalConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    smoke: dict[str, Any] = Field(default_factory=dict, description="dotted overrides applied by --smoke")

    @model_validator(mode="after")
    def _stages_known(self):
        for i, stage in enumerate(self.stages):
            if stage not in STAGE_KINDS:
                raise ValueError(f"stages[{i}]: unknown stage '{stage}' (known: {sorted(STAGE_KINDS)})")
            if stage != "fetch" and getattr(self, stage, None) is None:
                raise ValueError(f"stages[{i}]: stage '{stage}' has no '{stage}:' section")
        if not self.stages or self.stages[0] != "fetch":
            raise ValueError("stages[0]: every recipe starts with 'fetch'")
        if self.refine is not None and self.refine.dataset != "samples":
            raise ValueError("refine.dataset: must be 'samples' (refine trains on the filter stage's output)")
        for later, earlier in (("filter", "sample"), ("refine", "filter")):
            if later in self.stages and (earlier not in self.stages or self.stages.index(earlier) > self.stages.index(later)):
                raise ValueError(f"stages: '{later}' needs '{earlier}' before it")
        return self

    def stage_config(self, stage: str) -> BaseModel:
        return self.fetch if stage == "fetch" else getattr(self, stage)


# Stage name -> what kind of thing it does; later issues add rl/sample/filter stages here.
STAGE_KINDS = {"fetch": "checkpoint", "sft": "checkpoint", "reward_model": "reward_model", "dpo": "checkpoint",
               "grpo": "checkpoint", "ppo": "checkpoint", "sample": "dataset", "filter": "dataset", "refine": "checkpoint"}


class RecipeError(ValueError):
    """A recipe that cannot be loaded; the message names the file and the key path."""


def recipe_path(name_or_path: str | None) -> Path:
    if not name_or_path:
        name_or_path = DEFAULT_RECIPE
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise RecipeError(f"{p}: no such recipe file")
        return p
    candidate = RECIPES_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(x.stem for x in RECIPES_DIR.glob("*.yaml"))
        raise RecipeError(f"unknown recipe '{name_or_path}' (shipped: {', '.join(known)})")
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
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise RecipeError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of sections")
    data = copy.deepcopy(data)
    if smoke:
        smoke_over = data.get("smoke") or {}
        if not smoke_over:
            raise RecipeError(f"{path}: recipe has no 'smoke:' section")
        for key, value in smoke_over.items():
            apply_override(data, key, value, source=f"{path} smoke")
    if isinstance(overrides, dict):
        items = list(overrides.items())
    else:
        items = [parse_override(o) for o in overrides or []]
    for key, value in items:
        apply_override(data, key, value, source="--set")
    return validate_recipe(data, source=str(path))


def validate_recipe(data: dict, source: str = "<recipe>") -> RecipeConfig:
    try:
        return RecipeConfig.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"]) or "(top level)"
            msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"  {loc}: {msg}")
        raise RecipeError(f"{source}: invalid recipe\n" + "\n".join(lines)) from None


def resolved(model: BaseModel) -> dict:
    """A JSON-able dict of a config, every default filled in (what the cache key hashes)."""
    return json.loads(model.model_dump_json())
