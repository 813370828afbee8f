"""Reports of a comparison: a rich table for the terminal, JSON for machines."""

from .json_report import write_json
from .table import compare_table

__all__ = ["compare_table", "write_json"]
