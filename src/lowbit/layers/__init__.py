"""lowbit.layers: the modules a quantized model is made of (QuantLinear, LLM.int8()'s Int8OutlierLinear) and the
surgery that puts them in place (``quantize_model``). Its names load on first use (lowbit._lazy)."""

from .._lazy import lazy_exports

# public name -> its submodule
_WHERE = {
    "QuantLinear": "linear", "QuantizeReport": "surgery", "SavePretrainedError": "hf_quantizer",
    "model_weight_bytes": "surgery", "quantize_model": "surgery", "refuse_save_pretrained": "hf_quantizer",
    "select_linears": "surgery",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
