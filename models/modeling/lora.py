"""LoRA adapters (peft) and gradient checkpointing on the backbone a training stage trains.

`prepare_backbone` is what every recipe calls on the causal LM it loads: gradient checkpointing if
the stage asks for it, then LoRA adapters (Hu et al. 2021) if it has a `lora:` section. The adapters
are injected *in place* (`peft.inject_adapter_in_model`): the model keeps its transformers class, its
forward signature and its module tree, so the sampler, the padding-free forward, the reward and value
heads and the ZeRO-3 sampling copy treat it exactly like the plain model. Only the adapter matrices
require grad; the engine loop builds AdamW over those and checkpoints only them.

What leaves a stage is a plain model: `merged_state_dict` gives the base's parameter names with
W + (alpha / r) * B @ A folded in (computed beside the training weights, which stay unmerged), and
`save_adapter` writes the adapter alone in peft's format (`PeftModel.from_pretrained(base, dir)`
loads it). `adapters_disabled` / `AdaptersOff` run the same module with the adapters switched off:
the base model, the KL reference of LoRA training without a second copy of the weights.

What this does not do: several adapters at once, QLoRA (quantised bases), DoRA, or ZeRO-3 (the
engine loop refuses it with LoRA).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from models.recipes.train_config import LoraConfig

ADAPTER_NAME = "default"  # peft's name for a single adapter
ADAPTER_DIR = "adapter"  # where a stage's output keeps its adapter
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names
ADAPTER_CONFIG = "adapter_config.json"


# ----------------------------------------------------------------------------- applying


def enable_gradient_checkpointing(model) -> None:
    """transformers' gradient checkpointing with torch's non-reentrant implementation (the one that
    needs no input with requires_grad, so it works when the embeddings are frozen under LoRA).
    transformers >= 5.2x names it `activation_checkpointing_enable` (the old name warns)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """Inject LoRA adapters into `model` in place and freeze everything else; returns `model`.

    B starts at zero (peft, as in Hu et al. 2021), so the adapted model computes exactly the base's
    outputs until the first update."""
    import peft

    peft.inject_adapter_in_model(cfg.peft_config(), model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    return model


def prepare_backbone(model: torch.nn.Module, cfg) -> torch.nn.Module:
    """What a stage's TrainConfig asks of the causal LM it trains: gradient checkpointing
    (`cfg.gradient_checkpointing`) and LoRA adapters (`cfg.lora`). Returns the same module."""
    if cfg.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if cfg.lora is not None:
        apply_lora(model, cfg.lora)
    return model


def _lora_layers(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_adapters(model: torch.nn.Module) -> bool:
    return bool(_lora_layers(model))


# ----------------------------------------------------------------------------- the reference


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run `model`'s forwards with every adapter switched off (the base model); restored after."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    was = [not m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m, on in zip(layers, was):
            m.enable_adapters(on)


@contextlib.contextmanager
def merged_for_inference(model: torch.nn.Module):
    """Run `model`'s forwards on merged weights: each adapted layer's base weight is swapped for a new
    tensor W + delta (peft's `get_delta_weight`) and its adapters are switched off, so a decoding step
    costs one matmul per linear layer instead of three; on exit the original weight tensors are put
    back, untouched (no merge/unmerge rounding drifts the frozen base). The same function up to float
    rounding; it holds one extra copy of the adapted weights while inside. For inference only (under
    `torch.no_grad()`); a model without adapters runs as it is."""
    layers = list(_lora_layers(model).values()) if _may_have_adapters(model) else []
    if not layers:
        yield model
        return
    originals = []
    try:
        with torch.no_grad():
            for layer in layers:
                base = layer.get_base_layer()
                delta = _delta_weight(layer)
                originals.append((base, base.weight.data))
                base.weight.data = base.weight.data + delta
        with adapters_disabled(model):
            yield model
    finally:
        for base, weight in originals:
            base.weight.data = weight


def _delta_weight(layer) -> torch.Tensor:
    """What a LoRA layer adds to its base weight: (alpha / r) B A of each active adapter (peft's
    `get_delta_weight`, what `merge_and_unload` adds)."""
    return sum(layer.get_delta_weight(a) for a in layer.active_adapters if a in layer.lora_A)


def _may_have_adapters(model: torch.nn.Module) -> bool:
    """Cheap check before importing peft: a LoRA layer's `lora_A` container is a named submodule."""
    return any(name.endswith("lora_A") for name, _ in model.named_modules())


class AdaptersOff:
    """A callable view of an adapted causal LM that runs its forward with the adapters off: the frozen
    base policy (the KL reference of GRPO/PPO) without a second copy of the weights. `module` and
    `config` are those of the adapted model, as on a DeepSpeed engine, so `models.training.packing` treats the
    view as that model. Call it inside `torch.no_grad()`."""

    def __init__(self, model: torch.nn.Module):
        self.module = model

    @property
    def config(self):
        return self.module.config

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.module):
            return self.module(*args, **kwargs)


# ----------------------------------------------------------------------------- saving


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain model that `model` computes: the base's keys (`q_proj.weight`, not
    `q_proj.base_layer.weight`, no `lora_*` entries), each adapted weight W + delta with peft's own
    `get_delta_weight` (what `merge_and_unload` adds). New tensors; `model` is left unmerged. A model
    without adapters gives a copy of its state dict."""
    layers = _lora_layers(model)
    state = {}
    for key, v in model.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = v.detach().clone().contiguous()
    for name, layer in layers.items():
        base = layer.get_base_layer()
        delta = _delta_weight(layer)
        state[f"{name}.weight"] = (base.weight + delta).detach().contiguous()
    return state


def save_adapter(model: torch.nn.Module, directory: str | Path, base_name_or_path: str | None = None) -> None:
    """Write the adapter alone in peft's format: adapter_config.json + adapter_model.safetensors
    (keys `base_model.model.<module>.lora_A.weight`, as `PeftModel.save_pretrained` writes them)."""
    import peft
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = peft.get_peft_model_state_dict(model, adapter_name=ADAPTER_NAME)
    state = {f"base_model.model.{k}": v.detach().clone().contiguous() for k, v in state.items()}
    save_file(state, str(directory / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = model.peft_config[ADAPTER_NAME]
    cfg.base_model_name_or_path = base_name_or_path
    cfg.save_pretrained(str(directory))  # adapter_config.json


def trainable_bytes(model: torch.nn.Module, adam_moments: int = 2) -> int:
    """Bytes of the trainable parameters plus AdamW's state for them (two moments of the same
    shape and dtype): what training adds on top of holding the model."""
    return sum(p.numel() * p.element_size() * (1 + adam_moments) for p in model.parameters() if p.requires_grad)


__all__ = [
    "LoraConfig", "apply_lora", "prepare_backbone", "enable_gradient_checkpointing", "has_adapters",
    "adapters_disabled", "AdaptersOff", "merged_state_dict", "save_adapter", "trainable_bytes", "ADAPTER_DIR",
]
