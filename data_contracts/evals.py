"""Per-sample evaluation results: one row per (problem, sample) the evaluator generated.

``reward`` is null when the verifier could not judge the sample (verifiers return None then);
``completion`` may be empty (the model stopped at once).
"""

from __future__ import annotations

import pandas as pd

from data_contracts.schema import FINISH_REASONS, Field, boolean, integer, one_of, real, string, text, validate_frame

FIELDS = (
    Field("problem_id", text),
    Field("sample_idx", integer(minimum=0)),
    Field("greedy", boolean),
    Field("completion", string),
    Field("reward", real, nullable=True),
    Field("correct", boolean),
    Field("num_tokens", integer(minimum=0)),
    Field("finish_reason", one_of(*FINISH_REASONS)),
)


def validate_evals(df: pd.DataFrame, source: str) -> pd.DataFrame:
    return validate_frame(df, source, FIELDS)
