"""Reports of a comparison: a rich table for the terminal; JSON is written by lowbit.files.atomic."""

from .table import compare_table

__all__ = ["compare_table"]
