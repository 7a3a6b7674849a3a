"""Typed configs of the preference stages: DPO and the Bradley–Terry reward model.

Field names follow TRL's `DPOConfig` and `RewardConfig` where one exists (`beta`, `loss_type`,
`label_smoothing`, `center_rewards_coefficient`, `max_length` -> `max_seq_len` as in our SFTConfig,
`max_completion_length` -> `max_new_tokens` as in our sampler). Both stages read the same kind of
data, so the pair source (a file, or pairs built on-policy with the verifier) lives in one base.

`batch_size` counts *pairs* per optimizer step; each pair is two sequences in the forward pass.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models.data.builtin_task import STOP_STRINGS
from models.modeling.chat import CHAT_TEMPLATE_HELP, ChatTemplate
from models.recipes.train_config import TrainConfig


class PreferenceDataConfig(TrainConfig):
    """Where preference pairs come from (shared by DPOConfig and RewardModelConfig)."""

    dataset: str = Field(
        "onpolicy",
        description="'onpolicy': build pairs by sampling the starting policy and judging the samples with "
        "`reward` (a correct vs an incorrect completion of one prompt); or a local .jsonl/.parquet "
        "preference file in TRL's format (prompt, chosen, rejected), resolved to `dataset_path`",
    )
    prompts: str = Field(
        "builtin",
        description="problems for on-policy pairs: 'builtin' (the built-in task's train split) or a problems "
        "file (id, prompt, answer); resolved to `prompts_path` by the task layer. Unused for a file dataset",
    )
    num_pairs: int = Field(
        512, ge=1,
        description="on-policy pairs to build (at most one per prompt; fewer if the problems run out). "
        "512 pairs / 32 per step = 16 steps an epoch",
    )
    samples_per_prompt: int = Field(
        8, ge=2,
        description="completions sampled per prompt to find a correct and an incorrect one (as GRPO's "
        "num_generations, TRL default 8)",
    )
    max_new_tokens: int = Field(
        72, ge=1, description="completion budget of on-policy samples (TRL `max_completion_length`; as GRPO)"
    )
    temperature: float = Field(1.0, gt=0, description="sampling temperature of on-policy samples (TRL default 1.0)")
    stop_strings: list[str] = Field(
        default_factory=lambda: list(STOP_STRINGS),
        description="on-policy generation stops after any of these (built-in task: '</answer>'), and on EOS",
    )
    chat_template: ChatTemplate | None = Field(None, description=CHAT_TEMPLATE_HELP)
    reward: str = Field(
        "builtin_task",
        description="verifier from models.rewards that judges on-policy samples: >= 1 is correct, < 1 "
        "incorrect, None (unjudged) is neither",
    )
    rollout_batch_size: int = Field(
        128, ge=1, description="sequences decoded at once while building pairs (part of what fixes the pairs of a seed)"
    )
    max_seq_len: int = Field(
        160, ge=8,
        description="tokens of prompt + completion (TRL `max_length`, default 1024; 160 fits the built-in "
        "task as in SFTConfig). Longer completions are cut; a pair whose prompt leaves no room is dropped",
    )
    # Defaults of TrainConfig fields that differ for both preference stages.
    batch_size: int = Field(32, ge=1, description="pairs per optimizer step (each is 2 sequences)")
    micro_batch_size: int = Field(32, ge=1, description="pairs per rank per micro-step")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps (TRL/TrainingArguments default 0)")


class DPOConfig(PreferenceDataConfig):
    """Direct Preference Optimization (Rafailov et al. 2023) and IPO (Azar et al. 2023) against the
    frozen starting policy, whose log-probs are computed once per pair before training."""

    beta: float = Field(
        0.1, gt=0,
        description="DPO temperature / IPO tau (TRL DPOConfig `beta`, default 0.1, the DPO paper's value)",
    )
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid",
        description="'sigmoid' (DPO, eq. 7; TRL default) or 'ipo' (IPO eq. 17, on length-averaged log-probs)",
    )
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5,
        description="assumed probability of a flipped label: conservative DPO (cDPO, Mitchell 2023), "
        "-(1 - ls) log σ(βh) - ls log σ(-βh), the formula of TRL's 'sigmoid' loss with `label_smoothing` "
        "(not TRL's 'robust' loss, which also divides by 1 - 2 ls); default 0.0; sigmoid only",
    )
    rpo_alpha: float | None = Field(
        None, ge=0,
        description="weight of the chosen completion's length-normalised NLL added to each pair's loss "
        "(Iterative RPO, Pang et al. 2024, eq. 3, who use 1.0 for correct-vs-incorrect reasoning pairs; "
        "default None = plain DPO). Normalised per answer: each chosen answer's mean token NLL, then the "
        "mean over pairs; TRL's NLL term (`rpo_alpha`, now the 'sft' loss_type) is one mean over all "
        "chosen tokens of the batch, which weighs long answers more",
    )
    # Defaults of TrainConfig fields that differ for DPO.
    lr: float = Field(
        3e-5, gt=0,
        description="peak learning rate. TRL's default 1e-6 is tuned for 7B models and barely moves a 1.8M "
        "one; 3e-5 is the GRPO prototype's rate for the tiny model (2e-4 collapsed there). Not yet measured "
        "for DPO itself",
    )
    max_steps: int = Field(48, ge=1, description="optimizer steps (3 epochs of 512 pairs at 32 a step; TRL 3 epochs)")
    save_every: int = Field(16, ge=1, description="checkpoint every N steps (once an epoch at the defaults)")

    @model_validator(mode="after")
    def _smoothing_sigmoid_only(self):
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ValueError("label_smoothing is only defined for loss_type='sigmoid'")
        return self


class RewardModelConfig(PreferenceDataConfig):
    """A Bradley–Terry reward model (InstructGPT, Ouyang et al. 2022, eq. 1): the starting checkpoint's
    backbone plus a scalar head read at the last token of prompt + completion + EOS."""

    center_rewards_coefficient: float | None = Field(
        None, ge=0,
        description="weight of mean((s_c + s_r)^2), pushing scores towards mean 0 (Eisenstein et al. 2023, "
        "eq. 2; TRL RewardConfig, default None = off, 0.01 recommended)",
    )
    lr: float = Field(
        5e-5, gt=0,
        description="peak learning rate (TRL RewardConfig inherits TrainingArguments' 5e-5); not yet tuned "
        "for the tiny model",
    )
    max_steps: int = Field(16, ge=1, description="optimizer steps (one epoch of 512 pairs at 32 a step; TRL 1 epoch)")
    save_every: int = Field(8, ge=1, description="checkpoint every N steps")
