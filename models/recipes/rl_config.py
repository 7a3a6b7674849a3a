"""Typed configs of the RL stages: `RolloutConfig`, the sampling and batch fields shared by the
on-policy stages, and GRPO (PPO extends the same base in `models/recipes/ppo_config.py`).

Field names follow TRL's `GRPOConfig` where one exists (`num_generations`, `beta`, `epsilon`,
`epsilon_high`, `scale_rewards`, `loss_type`, `max_completion_length` -> `max_new_tokens` as in our
sampler), and every default cites the paper, peer or prototype measurement (DESIGN.md) it comes from.

The global batch of a GRPO step is `num_prompts * num_generations` completions; `batch_size` is
derived from those two and may only be given when it agrees.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from models.data.builtin_task import STOP_STRINGS
from models.modeling.chat import CHAT_TEMPLATE_HELP, ChatTemplate
from models.algorithms.reasoning import BUILTIN_MARKERS
from models.recipes.train_config import TrainConfig, node_layout


class RolloutConfig(TrainConfig):
    """What every on-policy stage shares (GRPO, PPO): the problems, how many completions a step
    samples of each, the sampler settings, the verifier rewards, the rollout log, and the batch
    derived as `num_prompts * num_generations`. Subclasses set `num_generations` (default and
    minimum differ) and may allow empty `rewards` (`rewards_required`)."""

    # False where something other than the verifiers may score (PPO's reward model).
    rewards_required: ClassVar[bool] = True

    prompts: str = Field(
        "builtin",
        description="'builtin' (the built-in task's train split) or a problems file with columns "
        "id, prompt, answer (.jsonl/.parquet); resolved to `prompts_path` by the task layer",
    )
    num_prompts: int = Field(
        16, ge=1,
        description="prompts per optimizer step / rollout batch (prototype: 16 prompts x 8 samples, 1.5-1.9 s/step)",
    )
    num_generations: int
    max_new_tokens: int = Field(
        72, ge=1,
        description="completion budget (TRL GRPO `max_completion_length`, PPO `response_length`); 72 fits 6 "
        "steps of ~10 tokens plus the answer of the built-in task (prototype)",
    )
    temperature: float = Field(
        1.0, gt=0,
        description="sampling temperature (TRL GRPO and OpenRLHF default 1.0; TRL PPO's 0.7 makes the sampler "
        "and the trained distribution differ unless log-probs are tempered too, which we do); the training "
        "log-probs (policy, reference, old) are all taken under softmax(logits / temperature), those of the "
        "sampled distribution",
    )
    stop_strings: list[str] = Field(
        default_factory=lambda: list(STOP_STRINGS),
        description="generation stops after any of these (built-in task: '</answer>'), and on EOS",
    )
    chat_template: ChatTemplate | None = Field(None, description=CHAT_TEMPLATE_HELP)
    reasoning_markers: dict[str, str] = Field(
        default_factory=lambda: dict(BUILTIN_MARKERS),
        description="name -> regex: each step logs `marker/<name>`, the fraction of completions where it "
        "matches (the built-in task's: working step by step, checking the result; models/algorithms/reasoning.py)",
    )
    aha_marker: str | None = Field(
        "self_check",
        description="the marker whose rate marks the 'aha' step: the first step from which its smoothed rate "
        "stays at or above aha_threshold to the end (DeepSeek-R1-Zero's self-verification, Guo et al. 2025, "
        "sec. 2.2.4); the stage run is tagged `posttrain.aha_step` and that step's completions are logged. "
        "None: no aha detection",
    )
    aha_threshold: float = Field(0.5, gt=0, le=1, description="the marker rate that counts as arrived")
    aha_window: int = Field(10, ge=1, description="steps in the trailing mean the aha threshold is checked on")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"builtin_task": 1.0},
        description="verifier reward names from models.rewards with their weights (TRL `reward_weights`); "
        "the built-in task's verifier by default. PPO: may be empty when a reward model gives the score "
        "(train_ppo checks that something scores)",
    )
    rollout_batch_size: int = Field(
        128, ge=1,
        description="sequences decoded at once; part of what fixes the rollouts of a seed, so changing "
        "it changes the samples",
    )
    log_rollouts: int = Field(
        2, ge=0, description="prompts whose completions are written to rollouts.jsonl on save steps"
    )
    # Defaults of TrainConfig fields that differ for the on-policy stages.
    lr: float = Field(
        3e-5, gt=0,
        description="peak learning rate (GRPO prototype on the built-in 1.8M model: 3e-5 gave +22 points "
        "pass@1, 2e-4 collapsed; see the PPO recipe report for the PPO measurement)",
    )
    max_steps: int = Field(60, ge=1, description="optimizer steps (GRPO prototype plateaued after ~2 min)")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps (TRL on-policy trainers, GRPO and PPO: 0)")
    lr_schedule: Literal["cosine", "constant"] = Field("constant", description="after warm-up (prototype)")
    save_every: int = Field(10, ge=1, description="checkpoint (and rollout sample) every N steps")
    batch_size: int = Field(
        128, ge=1, description="derived: num_prompts * num_generations (give it only to assert it)"
    )
    micro_batch_size: int = Field(
        128, ge=1, description="sequences per rank per micro-step; default batch_size / world_size"
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_batch(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        data = dict(data)
        fields = cls.model_fields
        n_prompts = data.get("num_prompts", fields["num_prompts"].default)
        g = data.get("num_generations", fields["num_generations"].default)
        if not (isinstance(n_prompts, int) and isinstance(g, int)):
            return data  # field validation reports the bad type
        derived = n_prompts * g
        given = data.get("batch_size")
        if given is None:
            data["batch_size"] = derived
        elif given != derived:
            raise ValueError(
                f"batch_size ({given}) must equal num_prompts × num_generations ({n_prompts} × {g} = "
                f"{derived}); leave batch_size out to derive it"
            )
        if data.get("micro_batch_size") is None:
            data = node_layout(data)  # world_size may come from nnodes × nproc_per_node
            world = data.get("world_size", 1)
            world = world if isinstance(world, int) and world > 0 else 1
            data["micro_batch_size"] = max(1, derived // world)
        return data

    @field_validator("rewards")
    @classmethod
    def _known_rewards(cls, v: dict[str, float]) -> dict[str, float]:
        from models.rewards import REWARD_NAMES  # cheap: reward modules load on first use

        if not v and cls.rewards_required:
            raise ValueError("at least one reward is needed")
        unknown = sorted(set(v) - set(REWARD_NAMES))
        if unknown:
            raise ValueError(f"unknown reward(s) {unknown}; known: {list(REWARD_NAMES)}")
        return v


# TRL GRPOConfig `loss_type` -> ours (trl/trainer/grpo_trainer.py, `_compute_loss`).
TRL_LOSS_TYPES = {
    "grpo": "seq_mean_token_mean",
    "dapo": "token_mean",
    "bnpo": "token_mean",
    "dr_grpo": "seq_mean_token_sum_norm",
}


class GRPOConfig(RolloutConfig):
    """Group Relative Policy Optimization (DeepSeekMath, Shao et al. 2024) with the DAPO fixes
    (Yu et al. 2025: clip-higher, token-mean loss, skipping groups without signal) as defaults."""

    num_generations: int = Field(
        8, ge=2,
        description="G, completions sampled per prompt (TRL `num_generations`, default 8; a group of 1 "
        "has no relative signal)",
    )
    top_p: float = Field(
        1.0, gt=0, le=1,
        description="nucleus sampling (TRL default 1.0). Below 1 the behaviour policy is truncated while "
        "the trained log-probs are not (as in TRL): keep 1.0 unless you accept that bias",
    )
    beta: float = Field(
        0.0, ge=0,
        description="KL coefficient against the frozen start policy (k3 estimator). 0 loads no reference "
        "model (TRL default 0.0, after DAPO and Dr. GRPO; the GRPO paper used 0.04)",
    )
    epsilon: float = Field(0.2, ge=0, description="lower clip of the ratio, 1 - epsilon (TRL `epsilon`, PPO 0.2)")
    epsilon_high: float = Field(
        0.28, ge=0, description="upper clip of the ratio, 1 + epsilon_high (DAPO clip-higher, Yu et al. 2025: 0.28)"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group",
        description="std used to scale advantages (TRL `scale_rewards`): 'group' (GRPO), 'batch', or "
        "'none' (Dr. GRPO, Liu et al. 2025)",
    )
    loss_type: Literal["seq_mean_token_mean", "token_mean", "seq_mean_token_sum_norm"] = Field(
        "token_mean",
        description="loss aggregation (see models/algorithms/losses.py): 'token_mean' over the global batch (DAPO), "
        "'seq_mean_token_mean' (GRPO paper), 'seq_mean_token_sum_norm' (Dr. GRPO: divides by the batch's "
        "rows × max_new_tokens, rows of skipped groups included). TRL's names are accepted and stored as "
        "ours (TRL_LOSS_TYPES): 'grpo', 'dapo', 'bnpo' (TRL: the local batch's tokens; here the global "
        "batch's, which is the same when there is one micro-batch), 'dr_grpo'",
    )
    importance_sampling_level: Literal["token", "sequence"] = Field(
        "token",
        description="'token': one ratio per token (GRPO). 'sequence': one ratio per completion, exp of the "
        "mean token log-ratio, clipped per sequence (GSPO, Zheng et al. 2025; TRL "
        "`importance_sampling_level`, default 'token'); GSPO averages over sequences, "
        "loss_type='seq_mean_token_mean'",
    )
    policy_loss: Literal["clip", "cispo"] = Field(
        "clip",
        description="'clip': the PPO/GRPO clipped surrogate. 'cispo': clip and stop-gradient the IS weight, "
        "times the log-prob, so clipped tokens keep their gradient (MiniMax-M1, 2025); epsilon_high is "
        "then the cap of the weight itself (TRL `loss_type='cispo'`, which also sets the token_mean "
        "aggregation and is accepted here as that pair; ScaleRL recommends 5.0)",
    )
    use_bias_correction_kl: bool = Field(
        False,
        description="multiply the k3 KL term by the importance ratio, correcting a KL estimated on the old "
        "policy's samples (DeepSeek-V3.2, 2025; TRL `use_bias_correction_kl`, default False); beta > 0 only",
    )
    mask_truncated_completions: bool = Field(
        False,
        description="completions cut by max_new_tokens (finish_reason 'length') get weight 0 in the loss; "
        "they still count in their group's advantages (DAPO, Yu et al. 2025, sec. 3.4 'overlong "
        "filtering'; TRL `mask_truncated_completions`, default False)",
    )
    overlong_buffer_len: int = Field(
        0, ge=0,
        description="soft overlong punishment: judged rewards of completions longer than max_new_tokens - "
        "this lose up to overlong_penalty_factor, linearly (DAPO, Yu et al. 2025, eq. 13; verl "
        "`overlong_buffer.len`, TRL `soft_punish_cache`; DAPO used 4096 of 20480). 0 disables it",
    )
    dynamic_sampling: bool = Field(
        False,
        description="DAPO's dynamic sampling: groups whose rewards all agree carry no signal, so more prompts "
        "are sampled until the batch has num_prompts groups whose rewards differ (or max_sampling_rounds "
        "is reached; the places left are filled with agreeing groups at weight 0). DAPO, Yu et al. 2025, "
        "sec. 3.2; verl `algorithm.filter_groups.enable`",
    )
    max_sampling_rounds: int = Field(
        3, ge=1,
        description="with dynamic_sampling: sampling rounds per batch at most, the first included (verl "
        "`algorithm.filter_groups.max_num_gen_batches`)",
    )
    overlong_penalty_factor: float = Field(
        1.0, ge=0,
        description="the penalty at max_new_tokens (verl `overlong_buffer.penalty_factor`, default 1.0 as in "
        "DAPO eq. 13 and TRL's get_soft_overlong_punishment)",
    )
    num_iterations: int = Field(
        1, ge=1,
        description="μ, optimizer steps taken on each rollout batch (TRL `num_iterations`, the GRPO paper's "
        "μ). 1 is on-policy (ratio 1, the clip never bites). Above 1 the batch sampled at step s feeds "
        "steps s .. s+μ-1, the ratio is taken against the log-probs the sampler recorded, and the clip "
        "bounds the later updates; `save_every` must be a multiple of μ so a resumed run starts on a "
        "fresh batch",
    )
    skip_zero_std_groups: bool = Field(
        True,
        description="groups whose G rewards are all equal get zero weight in the loss (they neither "
        "count in the normaliser nor pull through the KL term; DAPO dynamic sampling without the "
        "re-sampling). False keeps them with advantage 0",
    )

    @model_validator(mode="before")
    @classmethod
    def _trl_cispo(cls, data: Any) -> Any:
        # TRL's loss_type='cispo' is an objective plus the token_mean aggregation: stored as that pair.
        if isinstance(data, dict) and data.get("loss_type") == "cispo":
            if data.get("policy_loss", "cispo") != "cispo":
                raise ValueError(f"loss_type 'cispo' conflicts with policy_loss {data['policy_loss']!r}")
            data = {**data, "loss_type": "token_mean", "policy_loss": "cispo"}
        return data

    @model_validator(mode="after")
    def _buffer_inside_budget(self) -> "GRPOConfig":
        if self.overlong_buffer_len >= self.max_new_tokens:
            raise ValueError(
                f"overlong_buffer_len ({self.overlong_buffer_len}) must be below max_new_tokens ({self.max_new_tokens})"
            )
        return self

    @model_validator(mode="after")
    def _cispo_caps_the_weight(self) -> "GRPOConfig":
        if self.policy_loss == "cispo" and self.epsilon_high < 1:
            raise ValueError(
                f"policy_loss 'cispo' caps the importance weight at epsilon_high ({self.epsilon_high}), which "
                "must be >= 1 (TRL/ScaleRL: 5.0)"
            )
        return self

    @field_validator("loss_type", mode="before")
    @classmethod
    def _trl_loss_type(cls, v: Any) -> Any:
        # One stored name per aggregation, so a TRL config and ours hash to the same cache key.
        return TRL_LOSS_TYPES.get(v, v) if isinstance(v, str) else v

    @model_validator(mode="after")
    def _checkpoints_on_batch_boundaries(self) -> "GRPOConfig":
        if self.save_every % self.num_iterations:
            raise ValueError(
                f"save_every ({self.save_every}) must be a multiple of num_iterations ({self.num_iterations}): "
                "a checkpoint inside a rollout batch could not be resumed (the batch came from older weights)"
            )
        return self


__all__ = ["RolloutConfig", "GRPOConfig", "TRL_LOSS_TYPES"]
