"""GGUF block formats (SPEC.md §5): legacy 32-weight blocks and 256-weight K-quants."""

from . import kquants, legacy  # noqa: F401  (registration)
