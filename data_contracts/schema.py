"""A small layer over pandera: fields described by per-value rules, failures as ContractError.

A contract is a list of ``Field``s. Each field's ``rule`` looks at one non-null value and returns
the reason it is wrong (or None), so the error can say *why* ("expected a string, got int"), not
only which check failed. pandera runs the rules, nullability, column presence and uniqueness;
``validate_frame`` turns its collected failures into one ContractError for the lowest failing row.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.errors import SchemaError, SchemaErrors

from data_contracts.errors import ContractError
from data_contracts.io import source_rows

Rule = Callable[[Any], "str | None"]

FINISH_REASONS = ("stop", "eos", "length")


@dataclass(frozen=True)
class Field:
    """One column: its per-value rule, whether nulls are allowed, whether it must exist and be unique."""

    name: str
    rule: Rule
    nullable: bool = False
    required: bool = True
    unique: bool = False
    regex: bool = False  # ``name`` is a pattern matching several columns, e.g. "reward/.+"


@dataclass(frozen=True)
class RowCheck:
    """A rule across columns of one row; ``problem(df)`` gives a reason per row or None."""

    name: str
    field: str
    columns: tuple[str, ...]
    problem: Callable[[pd.Series], "str | None"]


# --- value rules -------------------------------------------------------------------------------


def _type_name(v: Any) -> str:
    return type(v).__name__


def string(v: Any) -> str | None:
    """Any string, empty allowed."""
    return None if isinstance(v, str) else f"expected a string, got {_type_name(v)}"


def text(v: Any) -> str | None:
    """A string with something besides whitespace in it."""
    if not isinstance(v, str):
        return f"expected a string, got {_type_name(v)}"
    if v == "":
        return "empty text"
    if not v.strip():
        return "whitespace-only text"
    return None


def integer(minimum: int | None = None) -> Rule:
    def rule(v: Any) -> str | None:
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
            return f"expected an integer, got {_type_name(v)}"
        if minimum is not None and v < minimum:
            return f"must be >= {minimum}, got {v}"
        return None

    return rule


def real(v: Any) -> str | None:
    """A finite number (an int is accepted: JSON writers drop the '.0')."""
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Real):
        return f"expected a number, got {_type_name(v)}"
    if not math.isfinite(float(v)):
        return f"must be finite, got {v}"
    return None


def boolean(v: Any) -> str | None:
    return None if isinstance(v, (bool, np.bool_)) else f"expected true/false, got {_type_name(v)}"


def one_of(*allowed: str) -> Rule:
    def rule(v: Any) -> str | None:
        if not isinstance(v, str):
            return f"expected a string, got {_type_name(v)}"
        return None if v in allowed else f"{v!r} is not one of {', '.join(allowed)}"

    return rule


# --- pandera bridge ----------------------------------------------------------------------------


def _safe(rule: Rule) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        try:
            return rule(v) is None
        except Exception:
            return False

    return check


def _first_seen(s: pd.Series) -> pd.Series:
    """True where a value has not appeared earlier in the column (hash-safe for any cell)."""
    keys = s.map(lambda v: v if isinstance(v, (str, int, float, bool)) else repr(v))
    return ~keys.duplicated(keep="first")


def _column(f: Field) -> pa.Column:
    checks = [pa.Check(_safe(f.rule), element_wise=True, name="rule")]
    if f.unique:
        checks.append(pa.Check(_first_seen, name="unique"))
    return pa.Column(None, nullable=f.nullable, required=f.required, regex=f.regex, checks=checks)


def _row_check(rc: RowCheck) -> pa.Check:
    def check(df: pd.DataFrame) -> pd.Series:
        if any(c not in df.columns for c in rc.columns):
            return pd.Series(True, index=df.index)
        return df.apply(lambda row: _safe(rc.problem)(row), axis=1).astype(bool)

    return pa.Check(check, name=f"row:{rc.name}")


def require_rows(df: pd.DataFrame, source: str) -> None:
    """A dataset a user gives has at least one record (an empty file is named as one)."""
    if len(df) == 0:
        raise ContractError(source, None, None, "no records: the file is empty (want one JSON object per line)")


def validate_frame(
    df: pd.DataFrame, source: str, fields: Sequence[Field], row_checks: Sequence[RowCheck] = ()
) -> pd.DataFrame:
    """Check ``df`` against ``fields``; raise ContractError for the first failing row.

    Whole-file problems (a missing column) come first; then the lowest row, and within a row the
    first failing field in ``fields`` order. Extra columns are allowed. Returns ``df`` unchanged.
    """
    schema = pa.DataFrameSchema(
        {f.name: _column(f) for f in fields}, checks=[_row_check(rc) for rc in row_checks], strict=False
    )
    try:
        schema.validate(df, lazy=True)
    except SchemaErrors as e:
        raise _first_error(df, source, fields, row_checks, e.failure_cases) from None
    except SchemaError as e:  # pragma: no cover - lazy validation collects into SchemaErrors
        raise ContractError(source, None, None, str(e)) from None
    return df


def _field_for(column: str, fields: Sequence[Field]) -> Field | None:
    for f in fields:
        if f.name == column or (f.regex and re.fullmatch(f.name, str(column))):
            return f
    return None


def _first_error(df, source, fields, row_checks, failures: pd.DataFrame) -> ContractError:
    rows = source_rows(df)
    order = {f.name: i for i, f in enumerate(fields)}
    by_check = {f"row:{rc.name}": rc for rc in row_checks}
    candidates = []  # (sort key, ContractError)
    for fc in failures.to_dict(orient="records"):
        column, check, label, case = fc["column"], str(fc["check"]), fc["index"], fc["failure_case"]
        if check == "column_in_dataframe":
            name = str(case)
            candidates.append(((0, 0, order.get(name, len(order))), ContractError(source, None, name, "missing column")))
            continue
        if label is None or (isinstance(label, float) and math.isnan(label)) or label not in rows:
            reason = f"{check} failed" + (f": {case}" if case is not None else "")
            candidates.append(((0, 1, order.get(column, len(order))), ContractError(source, None, column, reason)))
            continue
        row = rows[label]
        if check in by_check:
            rc = by_check[check]
            reason = rc.problem(df.loc[label]) or f"{rc.name} failed"
            field = rc.field
        else:
            field = str(column)
            f = _field_for(field, fields)
            value = df.at[label, field]
            if check == "not_nullable":
                reason = "null"
            elif check == "unique":
                first = next(rows[lab] for lab, v in df[field].items() if v == value)
                reason = f"duplicate value {value!r} (first at row {first})"
            else:
                try:
                    reason = (f.rule(value) if f else None) or f"{check} failed"
                except Exception as err:
                    reason = f"invalid value ({type(err).__name__})"
        key = (1, row, order.get(field, len(order)))
        candidates.append((key, ContractError(source, row, field, reason)))
    if not candidates:  # pragma: no cover - pandera reported nothing we can place
        return ContractError(source, None, None, "failed validation")
    return min(candidates, key=lambda c: c[0])[1]
