"""Number formats. Importing this package registers every grid format once (``lowbit``'s own
__init__ also imports ``lowbit.gguf``, which registers the GGUF block formats)."""

from . import cast, codebooks, int, learned, minifloat, mx, ternary  # noqa: F401  (registration)
from .registry import Codec, format_by_id, formats, get_format
from .spec import FormatSpec

__all__ = ["Codec", "FormatSpec", "format_by_id", "formats", "get_format"]

# The GGUF block formats register on import of lowbit.gguf, which builds on this package: imported
# last, so that every user of the registry sees them (lowbit's own __init__ imports nothing eagerly).
from .. import gguf  # noqa: E402, F401
