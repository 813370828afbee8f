"""lowbit: quantize language-model weights to low-bit formats and measure what each costs."""

from . import gguf  # noqa: F401  (registers the GGUF block formats)
from .fake_quant import fake_quantize, initial_scales
from .formats import FormatSpec, formats, get_format
from .quantize import quantize
from .tensor import QuantizedTensor

__all__ = ["FormatSpec", "QuantizedTensor", "fake_quantize", "formats", "get_format", "initial_scales", "quantize"]
__version__ = "0.1.0"

# Model-level API (issue 3). lowbit.models imports transformers only inside load_model.
from .models import load_model  # noqa: E402
from .nn import QuantConfig, QuantLinear, QuantPlan, quantize_model  # noqa: E402

__all__ += ["QuantConfig", "QuantLinear", "QuantPlan", "load_model", "quantize_model"]
