"""The one error every data contract raises: it names the file, the row and the field."""

from __future__ import annotations


class ContractError(ValueError):
    """A dataset broke its contract.

    ``row`` is 1-based and, for JSONL, equals the line number in the file (blank lines count);
    it is None for whole-file problems such as a missing column. ``field`` is the column name, or
    None when the problem is the row itself (invalid UTF-8, invalid JSON, not an object).

    >>> str(ContractError("data/train.jsonl", 3, "completion", "empty text"))
    "data/train.jsonl: row 3, field 'completion': empty text"
    """

    def __init__(self, file: str, row: int | None, field: str | None, reason: str):
        self.file = str(file)
        self.row = row
        self.field = field
        self.reason = reason
        super().__init__(self._message())

    def _message(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.field is not None:
            where.append(f"field {self.field!r}")
        if not where:
            return f"{self.file}: {self.reason}"
        return f"{self.file}: {', '.join(where)}: {self.reason}"

    def __reduce__(self):  # keep the attributes across pickling (Prefect, multiprocessing)
        return (type(self), (self.file, self.row, self.field, self.reason))
