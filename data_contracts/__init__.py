"""Schemas of every dataset that crosses a stage boundary, with errors naming file, row and field.

Modules: ``io`` (read_table, write_jsonl_atomic), ``problems``, ``sft``, ``preferences``, ``evals``,
``samples``, ``rollouts``, ``artifacts``. Only the (light) error type is re-exported here, so that
importing ``data_contracts.artifacts`` does not pull in pandas.
"""

from data_contracts.errors import ContractError

__all__ = ["ContractError"]
