"""lowbit.nn: QuantLinear and model surgery (``quantize_model``)."""

from .hf_quantizer import SavePretrainedError, refuse_save_pretrained
from .linear import QuantLinear
from .plan import PlanRule, QuantPlan
from .surgery import QuantConfig, QuantizeReport, model_weight_bytes, quantize_model, select_linears

__all__ = ["PlanRule", "QuantConfig", "QuantLinear", "QuantPlan", "QuantizeReport", "SavePretrainedError",
           "model_weight_bytes", "quantize_model", "refuse_save_pretrained", "select_linears"]
