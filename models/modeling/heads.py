"""Scalar heads on top of a transformers causal LM: the PPO critic and the reward model.

Both read the final hidden state (after the backbone's last norm), which is what
`output_hidden_states=True` returns last and what the base model returns as `last_hidden_state`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel

from models.algorithms.losses import last_valid_index

SCORE_HEAD_FILE = "score_head.safetensors"


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 -> (B, T) long positions that start at 0 on the first real token, so a
    left-padded row gets the same positions as its right-padded twin (pads get 0)."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)


class ScalarHead(nn.Module):
    """Linear hidden -> 1, for reward models and value functions.

    init "normal": weights ~ N(0, 1 / (hidden + 1)), bias 0: the reward-head init of Ziegler et al.
    2019 ("Fine-Tuning Language Models from Human Preferences", lm-human-preferences), which keeps
    the initial scores O(1) whatever the hidden size. init "zeros": weights and bias 0, the value
    head of the same codebase, so a fresh critic predicts 0 everywhere instead of O(1) noise.
    """

    def __init__(self, hidden_size: int, init: str = "normal"):
        super().__init__()
        if init not in ("normal", "zeros"):
            raise ValueError(f"ScalarHead init must be 'normal' or 'zeros', not {init!r}")
        self.linear = nn.Linear(hidden_size, 1)
        if init == "normal":
            nn.init.normal_(self.linear.weight, std=1.0 / math.sqrt(hidden_size + 1))
        else:
            nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: (..., H) -> (...) float, computed in the head's dtype (float32 by default)."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1)


class CausalLMWithValueHead(nn.Module):
    """Policy and critic sharing one backbone (the PPO setup of Ziegler et al. 2019).

    `forward` returns the LM logits and a value per position from the last hidden state.
    It does not shift anything: values[:, t] is V of the prefix ending at token t.
    """

    def __init__(self, pretrained_model: PreTrainedModel, value_head_init: str = "normal"):
        super().__init__()
        self.pretrained_model = pretrained_model
        self.value_head = ScalarHead(pretrained_model.config.hidden_size, value_head_init)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids, attention_mask: (B, T) -> (logits (B, T, V), values (B, T) float)."""
        out = self.pretrained_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            output_hidden_states=True,
        )
        return out.logits, self.value_head(out.hidden_states[-1])


class RewardModel(nn.Module):
    """Causal LM backbone + ScalarHead read at the last real token: one score per sequence.

    The forward pass runs the backbone's base model (`.base_model`), so the (B, T, V) logits are
    never computed; the LM head is kept in the module only so that `save` writes a plain causal-LM
    directory any transformers loader can open (it receives no gradient).
    """

    def __init__(self, pretrained_model: PreTrainedModel, score_head: ScalarHead | None = None):
        super().__init__()
        self.pretrained_model = pretrained_model
        self.score_head = score_head or ScalarHead(pretrained_model.config.hidden_size)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask: (B, T), left or right padded -> (B,) float score."""
        hidden = self.pretrained_model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
        ).last_hidden_state  # (B, T, H)
        last = last_valid_index(attention_mask)  # (B,)
        picked = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # (B, H)
        return self.score_head(picked)

    def save(self, directory: str | Path) -> None:
        """Write an HF causal-LM directory plus `score_head.safetensors` into `directory`; a backbone
        with LoRA adapters is written merged (models/modeling/lora.py), with the plain model's parameter names."""
        from models.modeling.lora import merged_state_dict

        directory = Path(directory)
        self.pretrained_model.save_pretrained(directory, state_dict=merged_state_dict(self.pretrained_model))
        state = {k: v.detach().contiguous().cpu() for k, v in self.score_head.state_dict().items()}
        save_file(state, str(directory / SCORE_HEAD_FILE))

    @classmethod
    def load(cls, directory: str | Path, **from_pretrained_kwargs) -> RewardModel:
        """Inverse of `save`; extra kwargs (dtype, device_map, ...) go to `from_pretrained`."""
        directory = Path(directory)
        backbone = AutoModelForCausalLM.from_pretrained(directory, **from_pretrained_kwargs)
        head = ScalarHead(backbone.config.hidden_size)
        head.load_state_dict(load_file(str(directory / SCORE_HEAD_FILE)))
        return cls(backbone, head)
