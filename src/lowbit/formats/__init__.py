"""Number formats. Importing this package registers every format once."""

from .. import gguf  # noqa: F401  (registration of the GGUF block formats)
from . import codebooks, int, minifloat, mx, ternary  # noqa: F401  (registration)
from .registry import Codec, format_by_id, formats, get_format
from .spec import FormatSpec

__all__ = ["Codec", "FormatSpec", "format_by_id", "formats", "get_format"]
