"""Typed configs of the rejection-sampling stages: `sample` (draw N scored candidates per prompt) and
`filter` (keep the ones worth re-training on). The `refine` stage reuses `models.config.SFTConfig`.

Defaults follow the rejection-sampling step of DeepSeek-R1 (DeepSeek-AI 2025, sec. 2.3.3: sample
from the RL checkpoint, keep correct, well-formatted, de-duplicated answers, a few per prompt) and
the prototype measurements in DESIGN.md (72 new tokens fit the built-in task, 8 samples per prompt).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from models.data.builtin_task import STOP_STRINGS
from models.modeling.chat import CHAT_TEMPLATE_HELP, ChatTemplate
from models.recipes.train_config import Strict

FILTER_NAMES = ("pass_rate", "format", "reward", "length", "dedupe", "best_of_n", "max_per_prompt")
"""Every filter `models.algorithms.filters.apply_filters` knows, in the default order of application."""


class SampleConfig(Strict):
    """Rejection sampling: `num_samples` completions for each of the first `num_prompts` prompts,
    each scored by every reward in `rewards`."""

    prompts: str = Field(
        "builtin",
        description="'builtin' (the built-in task's train split) or a problems file with columns id, "
        "prompt, answer (.jsonl/.json/.parquet); resolved to a path by the task layer",
    )
    num_prompts: int = Field(512, ge=1, description="sample the first N prompts of `prompts`")
    num_samples: int = Field(
        8, ge=1, description="candidates per prompt (R1's rejection sampling and the prototype's pass@8 use 8)"
    )
    temperature: float = Field(
        1.0, gt=0, description="sampling temperature; 1.0 samples the policy as it is (diverse candidates)"
    )
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (Holtzman et al. 2020); 1.0 = off")
    max_new_tokens: int = Field(
        72, ge=1, description="completion budget; 72 fits 6 steps of ~10 tokens plus the answer (prototype)"
    )
    stop_strings: list[str] = Field(
        default_factory=lambda: list(STOP_STRINGS),
        description="generation stops after any of these (built-in task: '</answer>'), and on EOS",
    )
    chat_template: ChatTemplate | None = Field(None, description=CHAT_TEMPLATE_HELP)
    batch_size: int = Field(128, ge=1, description="sequences generated at once (as evaluation)")
    seed: int = Field(0, description="sampling seed; the same seed and batch_size give the same samples")
    rewards: dict[str, float] = Field(
        default_factory=lambda: {"builtin_task": 1.0, "format": 0.0},
        description="reward names from models.rewards with weights. Every named reward is computed and "
        "stored as a `reward/<name>` column; `total` is the weighted sum (a weight of 0 records a reward "
        "for the filter without counting it). Default: correctness counts, format is recorded",
    )

    @field_validator("rewards")
    @classmethod
    def _some_reward(cls, v: dict[str, float]) -> dict[str, float]:
        if not v:
            raise ValueError("name at least one reward")
        return v


class FilterConfig(Strict):
    """Which sampled candidates become refine (SFT) data. Filters run in `order`; a filter switched off
    by its own setting (None / False / 'none') does not run and is absent from the filter report."""

    min_reward: float | None = Field(
        1.0,
        description="keep samples whose `total` is >= this (1.0 with the default rewards = correct only; "
        "R1 keeps only correct answers). None = off",
    )
    max_pass_rate: float | None = Field(
        None, ge=0, le=1,
        description="drop every sample of a prompt whose pass rate (the fraction of its samples with "
        "`total >= min_reward`) is above this: prompts the model always solves teach refine nothing "
        "(difficulty filtering). Counted over all of a prompt's samples, so it runs first. None = off",
    )
    best_of_n: bool = Field(
        False,
        description="keep only the best sample of each prompt: highest `total`, ties to the shortest "
        "completion, then the first drawn (best-of-n / RAFT, Dong et al. 2023)",
    )
    dedupe: Literal["none", "exact", "normalized"] = Field(
        "normalized",
        description="drop repeated completions of the same prompt, keeping the first: 'exact' string "
        "match, 'normalized' after collapsing whitespace and lowercasing, 'none' = off",
    )
    min_length: int | None = Field(None, ge=0, description="keep completions of >= this many tokens; None = off")
    max_length: int | None = Field(None, ge=0, description="keep completions of <= this many tokens; None = off")
    require_format: bool = Field(
        True,
        description="keep only samples whose `format` reward is 1.0 (R1 drops mixed-language and badly "
        "formatted outputs); computed with the `format` reward when the column is absent",
    )
    max_per_prompt: int | None = Field(
        4, ge=1,
        description="keep at most this many samples of each prompt (the first drawn), so easy prompts do "
        "not dominate the refine data; None = off",
    )
    order: list[str] = Field(
        default_factory=lambda: list(FILTER_NAMES),
        description="the order filters apply in: a permutation of "
        + ", ".join(FILTER_NAMES)
        + " (an order without pass_rate runs it first). The pass rate needs all of a prompt's "
        "samples, then cheap row-local filters; per-prompt caps last, so they count only good samples",
    )

    @field_validator("order")
    @classmethod
    def _order_is_permutation(cls, v: list[str]) -> list[str]:
        if "pass_rate" not in v:  # orders written before the filter existed: it runs first
            v = ["pass_rate", *v]
        unknown = [name for name in v if name not in FILTER_NAMES]
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown} (known: {', '.join(FILTER_NAMES)})")
        if sorted(v) != sorted(FILTER_NAMES):
            missing = [n for n in FILTER_NAMES if n not in v]
            repeated = sorted({n for n in v if v.count(n) > 1})
            raise ValueError(
                f"order must name every filter exactly once (missing: {missing}, repeated: {repeated}); "
                "switch a filter off with its own setting instead"
            )
        return v

    @model_validator(mode="after")
    def _pass_rate_needs_threshold(self):
        if self.max_pass_rate is not None and self.min_reward is None:
            raise ValueError("max_pass_rate counts samples with total >= min_reward: set min_reward too")
        return self

    @model_validator(mode="after")
    def _length_bounds(self):
        if self.min_length is not None and self.max_length is not None and self.min_length > self.max_length:
            raise ValueError(f"min_length ({self.min_length}) > max_length ({self.max_length})")
        return self


__all__ = ["FILTER_NAMES", "SampleConfig", "FilterConfig"]
