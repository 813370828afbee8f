"""lowbit.nn: QuantLinear and model surgery (``quantize_model``). Its names load on first use
(lowbit._lazy), so that ``lowbit.nn.config`` (the label reader `lowbit formats LABEL` uses) imports
without torch."""

from .._lazy import lazy_exports

# public name -> its submodule
_WHERE = {
    "PlanRule": "plan", "QuantConfig": "config", "QuantLinear": "linear", "QuantPlan": "plan",
    "QuantizeReport": "surgery", "SavePretrainedError": "hf_quantizer", "model_weight_bytes": "surgery",
    "quantize_model": "surgery", "refuse_save_pretrained": "hf_quantizer", "select_linears": "surgery",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
