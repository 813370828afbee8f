"""GGUF block formats (SPEC.md §5), bit-exact with the gguf package."""

from . import legacy  # noqa: F401  (registration)
