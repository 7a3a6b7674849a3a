"""Reading and writing dataset files: JSONL, JSON (a list of records) and Parquet.

``read_table`` keeps every value as the Python object the file held (object columns, no dtype
guessing), so the contracts can tell an int from a string. The file row of each DataFrame row is
kept in ``df.attrs["rows"]`` (1-based; for JSONL the line number, blank lines included) so that a
contract failure names the row a person would look at.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from data_contracts.errors import ContractError

ROWS_ATTR = "rows"
SOURCE_ATTR = "source"


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``.jsonl``, ``.json`` or ``.parquet`` into an object-dtype DataFrame.

    Raises ContractError for a row that cannot be read (invalid UTF-8, invalid JSON, not an
    object) and for an unreadable or unsupported file; FileNotFoundError if it does not exist.
    Columns are the union of the records' keys; a key missing from a record reads as NaN.
    """
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{source}: no such file")
    suffix = p.suffix.lower()
    if suffix == ".jsonl":
        records, rows = _read_jsonl(p, source)
        df = pd.DataFrame(records, dtype=object)
    elif suffix == ".json":
        records, rows = _read_json(p, source)
        df = pd.DataFrame(records, dtype=object)
    elif suffix == ".parquet":
        try:
            df = pd.read_parquet(p).astype(object)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise ContractError(source, None, None, f"unreadable parquet file: {e}") from e
        rows = list(range(1, len(df) + 1))
    else:
        raise ContractError(source, None, None, f"unsupported file type {suffix!r} (want .jsonl, .json or .parquet)")
    df.attrs[ROWS_ATTR] = rows
    df.attrs[SOURCE_ATTR] = source
    return df


def _read_jsonl(p: Path, source: str) -> tuple[list[dict], list[int]]:
    records, rows = [], []
    with open(p, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a UTF-8 byte-order mark
                raw = raw[3:]
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ContractError(source, lineno, None, "invalid UTF-8") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ContractError(source, lineno, None, f"invalid JSON: {e.msg} at column {e.colno}") from e
            if not isinstance(obj, dict):
                raise ContractError(source, lineno, None, f"not a JSON object (got {type(obj).__name__})")
            records.append(obj)
            rows.append(lineno)
    return records, rows


def _read_json(p: Path, source: str) -> tuple[list[dict], list[int]]:
    try:
        data = json.loads(p.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ContractError(source, None, None, "invalid UTF-8") from e
    except json.JSONDecodeError as e:
        raise ContractError(source, None, None, f"invalid JSON: {e.msg} at line {e.lineno}") from e
    if not isinstance(data, list):
        raise ContractError(source, None, None, f"expected a JSON list of records, got {type(data).__name__}")
    for i, obj in enumerate(data, start=1):
        if not isinstance(obj, dict):
            raise ContractError(source, i, None, f"not a JSON object (got {type(obj).__name__})")
    return data, list(range(1, len(data) + 1))


def source_rows(df: pd.DataFrame) -> dict[Any, int]:
    """DataFrame index label -> 1-based file row (position + 1 when the frame has no file rows)."""
    rows = df.attrs.get(ROWS_ATTR)
    if rows is None or len(rows) != len(df):
        rows = range(1, len(df) + 1)
    return dict(zip(df.index, rows))


def _plain(value: Any) -> Any:
    """A JSON-serialisable copy of a cell: numpy scalars/arrays unwrapped, NaN/NA -> null."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    if value is pd.NA or value is pd.NaT:
        return None
    if isinstance(value, pd.Timestamp):
        return value.isoformat()
    return value


def write_jsonl_atomic(data: pd.DataFrame | Iterable[Mapping], path: str | os.PathLike) -> Path:
    """Write records as JSONL so that the final name only ever holds a complete file.

    Writes to a temp file in the same directory, fsyncs it, then ``os.replace``s it onto ``path``
    (atomic on POSIX within one filesystem) and fsyncs the directory. NaN becomes null.
    """
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    records = data.to_dict(orient="records") if isinstance(data, pd.DataFrame) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            for rec in records:
                fh.write(json.dumps(_plain(rec), ensure_ascii=False, allow_nan=False))
                fh.write("\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, out)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(out.parent)
    return out


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
