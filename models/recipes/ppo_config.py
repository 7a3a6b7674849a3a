"""Typed config of the PPO stage (RLHF-style PPO with a learned critic).

Field names follow TRL's `PPOConfig` where one exists (`kl_coef`, `cliprange`, `cliprange_value`,
`vf_coef`, `gamma`, `lam`, `whiten_rewards` -> `whiten_advantages`, `num_ppo_epochs` ->
`ppo_epochs`, `kl_estimator`), the sampling, reward and batch fields are shared with `GRPOConfig`
(`RolloutConfig` in `models/recipes/rl_config.py`), and every default cites the paper or peer it comes from.

The global batch of a step is `num_prompts * num_generations` completions; `batch_size` is derived
from those two and may only be given when it agrees (as for GRPO).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from models.recipes.rl_config import RolloutConfig


class PPOConfig(RolloutConfig):
    """PPO for language models (Ziegler et al. 2019; InstructGPT, Ouyang et al. 2022): a per-token
    reward of -kl_coef * KL(pi || pi_ref) plus the sequence score at the last token, GAE advantages
    from a value head that shares the policy's backbone, and the clipped policy and value losses."""

    # Empty `rewards` is allowed: a reward model may give the score (train_ppo checks that something scores).
    rewards_required = False

    num_generations: int = Field(
        4, ge=1,
        description="completions sampled per prompt (TRL PPO samples 1; 1-4 are sensible: PPO needs no "
        "group, more samples per prompt only lower the variance of the batch)",
    )
    reward_model: str | None = Field(
        None,
        description="a trained reward-model directory (the reward_model stage's output); its score is "
        "added with weight `reward_model_weight`. The task layer passes the upstream stage's output as "
        "spec['reward_model_path'], which takes precedence",
    )
    reward_model_weight: float = Field(1.0, description="weight of the reward-model score in the sequence score")
    kl_coef: float = Field(
        0.05, ge=0,
        description="beta of the per-token KL penalty in the reward (TRL PPOConfig `kl_coef` 0.05; "
        "InstructGPT eq. 2 uses a fixed beta too). 0 loads no reference model",
    )
    kl_estimator: Literal["k1", "k3"] = Field(
        "k1", description="per-token KL estimator in the reward (TRL `kl_estimator`, default 'k1' as in Ziegler et al.)"
    )
    gamma: float = Field(1.0, ge=0, le=1, description="discount (TRL 1.0: the episode is one completion)")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda (TRL 0.95; Schulman et al. 2015)")
    cliprange: float = Field(0.2, gt=0, description="policy ratio clip epsilon (TRL 0.2; Schulman et al. 2017)")
    cliprange_value: float = Field(
        0.2, gt=0, description="value clip around the rollout-time values (TRL 0.2; Huang et al. 2022 #9)"
    )
    vf_coef: float = Field(0.1, ge=0, description="weight of the value loss in the total loss (TRL 0.1)")
    whiten_advantages: bool = Field(
        True,
        description="normalise advantages to mean 0 / std 1 over all completion tokens of the global batch "
        "(TRL and OpenRLHF do; Huang et al. 2022 #7)",
    )
    ppo_epochs: int = Field(
        1, ge=1,
        description="optimizer steps on the same rollouts (TRL `num_ppo_epochs` 4 with mini-batches; here "
        "each epoch is one full-batch optimizer step, so max_steps counts epochs). 1 = on-policy, as GRPO's "
        "mu = 1. > 1 needs max_steps and save_every to be multiples of it, so that a checkpoint always "
        "sits at a rollout boundary and resume regenerates the rollouts exactly",
    )
    value_lr_multiplier: float = Field(
        1.0, gt=0,
        description="the value head's lr is lr * this (OpenRLHF trains its separate critic at ~18x the "
        "actor's lr: 9e-6 vs 5e-7); the shared backbone keeps lr",
    )
    value_head_init: Literal["normal", "zeros"] = Field(
        "normal",
        description="the fresh critic head: 'normal' N(0, 1/(hidden+1)) (Ziegler et al.'s reward-head init) "
        "or 'zeros' (their value-head init: V = 0 everywhere at the start, so GAE begins as the plain "
        "return instead of a sum of noisy TD errors)",
    )
    critic_warmup: int = Field(
        0, ge=0,
        description="first steps that train the critic alone, the policy loss weighted 0 (verl "
        "`trainer.critic_warmup`; VC-PPO, Yuan et al. 2025, pretrains the value model the same way)",
    )
    # Defaults of RolloutConfig fields that differ for PPO.
    batch_size: int = Field(64, ge=1, description="derived: num_prompts * num_generations (give it only to assert it)")
    micro_batch_size: int = Field(
        64, ge=1, description="sequences per rank per micro-step; default batch_size / world_size"
    )

    @model_validator(mode="after")
    def _consistent(self):
        if self.ppo_epochs > 1 and (self.max_steps % self.ppo_epochs or self.save_every % self.ppo_epochs):
            raise ValueError(
                f"ppo_epochs ({self.ppo_epochs}) must divide max_steps ({self.max_steps}) and save_every "
                f"({self.save_every}): checkpoints must fall on rollout boundaries for exact resume"
            )
        return self


__all__ = ["PPOConfig"]
