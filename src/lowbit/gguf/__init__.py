"""GGUF block formats: legacy 32-weight blocks and 256-weight K-quants.

Rules: docs/formats.md#gguf-legacy-blocks and docs/formats.md#gguf-k-quants.
"""

from . import kquants, legacy  # noqa: F401  (registration)
