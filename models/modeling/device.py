"""Where tensors and models live: the training engine's device, CUDA when present, else the CPU.

DeepSpeed's engine moves the trained model to its accelerator (``cuda:<LOCAL_RANK>`` on a GPU host,
the CPU here). Everything else a stage builds (collated batches, a frozen reference policy, a reward
scorer, the model an evaluation samples from) must follow it; these helpers are the one way to say so.
On the CPU every move is a no-op.
"""

from __future__ import annotations

import os

import torch


def training_device() -> torch.device:
    """The device DeepSpeed trains on in this process: ``cuda:<LOCAL_RANK>`` when CUDA is present."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")


def device_of(module) -> torch.device:
    """The device of a model, a DeepSpeed engine or a view over one (its first parameter's)."""
    device = getattr(module, "device", None)
    if isinstance(device, torch.device):
        return device
    if isinstance(device, str):
        return torch.device(device)
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(batch: dict, device: torch.device) -> dict:
    """The batch's tensors on `device` (other values as they are)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
