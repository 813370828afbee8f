"""Number formats. The registry (``formats``, ``get_format``, ...) registers every format, the
GGUF block formats of ``lowbit.gguf`` included, on its first lookup; this package's names load on
first use, so that ``lowbit.formats.table`` and ``lowbit.formats.facts`` import without torch."""

from .._lazy import lazy_exports

# public name -> its submodule (lowbit._lazy)
_WHERE = {
    "Codec": "registry",
    "FormatSpec": "spec",
    "format_by_id": "registry",
    "formats": "registry",
    "get_format": "registry",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
