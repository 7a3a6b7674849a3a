"""Base config classes shared by every training stage (kept apart so RL configs can extend them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoraConfig(Strict):
    """A training stage's `lora:` section: low-rank adapters instead of full fine-tuning."""

    r: int = Field(
        16, ge=1,
        description="adapter rank (TRL ModelConfig `lora_r` 16; peft's own default is 8)",
    )
    alpha: float = Field(
        32.0, gt=0,
        description="scaling numerator: the update is (alpha / r) * B @ A (TRL ModelConfig `lora_alpha` 32, "
        "i.e. alpha = 2r, as in TRL's LoRA guide)",
    )
    dropout: float = Field(
        0.0, ge=0, lt=1,
        description="dropout on the adapter's input (peft LoraConfig `lora_dropout` default 0.0; TRL uses 0.05). "
        "With dropout > 0 the engine loop seeds the torch RNG per step so a resumed run draws the same masks",
    )
    target_modules: str | list[str] = Field(
        "all-linear",
        description="module names that get adapters, or 'all-linear' (peft: every linear layer but the LM "
        "head; for Llama q/k/v/o_proj and gate/up/down_proj). TRL's LoRA guide ('LoRA Without Regret', "
        "Schulman et al. 2025) recommends all linear layers, MLP included, over attention-only adapters",
    )

    def peft_config(self):
        import peft

        return peft.LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=self.target_modules,
            bias="none", task_type="CAUSAL_LM",
        )


class TrainConfig(Strict):
    """Settings shared by every stage that trains on the DeepSpeed engine loop."""

    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    adam_betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas (nanoGPT)")
    optim: Literal["adamw_torch", "adamw_torch_fused"] = Field(
        "adamw_torch",
        description="AdamW kernel, by transformers' `optim` names: 'adamw_torch' (torch's default "
        "implementation) or 'adamw_torch_fused' (one fused kernel over every tensor; transformers' "
        "default). The same update up to float rounding, ~2% faster SFT steps here, but that rounding "
        "moves where the built-in recipe's SFT crosses its copying cliff (README), so the recipes "
        "keep the measured default",
    )
    warmup_steps: int = Field(10, ge=0, description="linear warm-up steps")
    lr_schedule: Literal["cosine", "constant"] = Field("cosine", description="after warm-up")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine floor as a fraction of lr")
    max_steps: int = Field(200, ge=1, description="optimizer steps")
    batch_size: int = Field(16, ge=1, description="global batch (sequences per optimizer step)")
    micro_batch_size: int = Field(16, ge=1, description="sequences per rank per forward/backward")
    max_grad_norm: float = Field(1.0, gt=0, description="gradient clipping (DeepSpeed)")
    save_every: int = Field(50, ge=1, description="checkpoint every N steps into the work dir")
    keep_checkpoints: int = Field(
        2, ge=1,
        description="newest checkpoints kept on disk while the stage trains; a finished stage keeps its "
        "final one only (what a rerun resumes from if the flow dies before recording the stage's result)",
    )
    log_every: int = Field(1, ge=1, description="metrics every N steps")
    seed: int = Field(0, description="seed for init, data order and sampling")
    deepspeed: str = Field("zero0.json", description="DeepSpeed JSON: a file in deployments/deepspeed/ or a path")
    zero_stage: int | None = Field(None, ge=0, le=3, description="override the JSON's ZeRO stage")
    torch_compile: bool = Field(
        False,
        description="compile the model with torch.compile (inductor, dynamic shapes) through DeepSpeed's "
        "engine.compile, as transformers' `torch_compile`. Measured on the built-in model on 2 CPU cores: "
        "SFT steps ~10% faster once compiled, after 20-40 s of compiling per stage (cached in the state "
        "dir's inductor cache): it pays on long stages and real models, not on the built-in recipes",
    )
    precision: Literal["fp32", "bf16"] = Field("fp32", description="training precision (CPU: fp32 or bf16)")
    world_size: int = Field(
        1, ge=1,
        description="processes (ranks) over every node: nnodes × nproc_per_node; > 1 launches with torchrun",
    )
    nnodes: int = Field(
        1, ge=1,
        description="machines the stage trains on (docs/multinode.md). Node 0 is the stage's own process; "
        "every other node runs `posttrain node-agent` (node 0 prints the exact command) and all meet at a "
        "c10d rendezvous (torchrun --nnodes --rdzv-backend=c10d --rdzv-endpoint). The work dir (the state "
        "dir) must be on storage every node sees at the same path",
    )
    nproc_per_node: int | None = Field(
        None, ge=1,
        description="ranks per node; default world_size / nnodes (world_size on one node, 1 when only "
        "nnodes is given)",
    )
    rdzv_endpoint: str | None = Field(
        None,
        description="HOST or HOST:PORT of the rendezvous store, hosted by node 0 (nnodes > 1 only); default "
        "node 0's hostname and a free port. Give one the other nodes can reach (a Kubernetes Service, "
        "the first Slurm node)",
    )
    rdzv_timeout_s: float = Field(
        600.0, gt=0,
        description="seconds every node has to join the rendezvous (torchrun's join_timeout, its default 600); "
        "a node that never arrives fails the stage with an error naming the agent command after this",
    )
    num_threads: int | None = Field(None, ge=1, description="torch threads per rank (default: cores / world_size)")
    lora: LoraConfig | None = Field(
        None,
        description="LoRA adapters (peft) instead of full fine-tuning; None trains every weight. The stage "
        "output is still a plain merged model, with the adapter alone beside it in output/adapter/",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="recompute activations in the backward pass instead of keeping them (transformers' "
        "`gradient_checkpointing`, torch's non-reentrant checkpoint): less memory, ~1 more forward per step",
    )

    @model_validator(mode="before")
    @classmethod
    def _node_layout(cls, data: Any) -> Any:
        return node_layout(data)

    @model_validator(mode="after")
    def _batch_divides(self):
        per_step = self.micro_batch_size * self.world_size
        if self.batch_size % per_step:
            raise ValueError(
                f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size × world_size "
                f"({self.micro_batch_size} × {self.world_size})"
            )
        return self

    @model_validator(mode="after")
    def _deepspeed_json_exists(self):
        deepspeed_json(self.deepspeed)  # a missing file fails the recipe's load, not a stage hours in
        return self

    @model_validator(mode="after")
    def _lora_not_zero3(self):
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora: not supported with ZeRO-3 (zero_stage 3); use ZeRO-0/1/2 (adapters are small)")
        return self

    @property
    def grad_accum(self) -> int:
        return self.batch_size // (self.micro_batch_size * self.world_size)


DEEPSPEED_DIR = Path(__file__).resolve().parents[2] / "deployments" / "deepspeed"


def deepspeed_json(name: str) -> Path:
    """The DeepSpeed JSON a stage names: a path, or a file of deployments/deepspeed/."""
    p = Path(name)
    if not p.is_absolute() and not p.exists():
        p = DEEPSPEED_DIR / name
    if not p.is_file():
        raise ValueError(f"deepspeed config {name}: not found (looked in {DEEPSPEED_DIR}: "
                         f"{', '.join(sorted(f.name for f in DEEPSPEED_DIR.glob('*.json')))})")
    return p


def node_layout(data: Any) -> Any:
    """Fill world_size / nproc_per_node of a raw train config from the others (world_size = nnodes ×
    nproc_per_node) and refuse combinations that disagree. A config without the node fields (every
    one written before them) resolves exactly as before: nnodes 1, nproc_per_node = world_size."""
    if not isinstance(data, dict):
        return data
    data = dict(data)
    nnodes, nproc, world = data.get("nnodes"), data.get("nproc_per_node"), data.get("world_size")
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1) for v in (nnodes, nproc, world)):
        return data  # field validation reports the bad value
    n = 1 if nnodes is None else nnodes
    if nproc is None:
        if world is None:
            nproc, world = 1, n
        elif world % n:
            raise ValueError(f"world_size ({world}) must be a multiple of nnodes ({n}): world_size = nnodes × nproc_per_node")
        else:
            nproc = world // n
    elif world is None:
        world = n * nproc
    elif world != n * nproc:
        raise ValueError(
            f"world_size ({world}) must equal nnodes × nproc_per_node ({n} × {nproc} = {n * nproc}); "
            "give two of the three"
        )
    endpoint = data.get("rdzv_endpoint")
    if endpoint is not None:
        if n == 1:
            raise ValueError("rdzv_endpoint is for a multi-node stage (nnodes > 1); one node needs no rendezvous")
        if not isinstance(endpoint, str):
            return data
        parse_endpoint(endpoint)
    data.update(world_size=world, nproc_per_node=nproc)
    return data


def parse_endpoint(endpoint: str) -> tuple[str, int | None]:
    """'HOST', 'HOST:PORT' or '[IPv6]:PORT' -> (host, port or None)."""
    e = endpoint.strip()
    bad = ValueError(f"rdzv_endpoint {endpoint!r}: expected HOST or HOST:PORT")
    if e.startswith("["):
        host, _, rest = e[1:].partition("]")
        if rest and not rest.startswith(":"):
            raise bad
        port = rest[1:]
    elif e.count(":") == 1:
        host, port = e.split(":")
    else:  # a name, an IPv4 address or a bare IPv6 address
        host, port = e, ""
    if not host or any(c.isspace() for c in host):
        raise bad
    if port == "":
        return host, None
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"rdzv_endpoint {endpoint!r}: port must be a number in 1..65535")
    return host, int(port)
