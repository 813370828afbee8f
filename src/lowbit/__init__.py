"""lowbit: quantize language-model weights to low-bit formats and measure what each costs."""

from .formats import FormatSpec, formats, get_format
from .quantize import quantize
from .tensor import QuantizedTensor

__all__ = ["FormatSpec", "QuantizedTensor", "formats", "get_format", "quantize"]
__version__ = "0.1.0"
