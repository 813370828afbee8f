"""lowbit.nn: QuantLinear and model surgery (``quantize_model``)."""

from .linear import QuantLinear
from .surgery import QuantConfig, QuantizeReport, model_weight_bytes, quantize_model, select_linears

__all__ = ["QuantConfig", "QuantLinear", "QuantizeReport", "model_weight_bytes", "quantize_model", "select_linears"]
