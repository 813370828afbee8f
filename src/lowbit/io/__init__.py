"""lowbit.io: save and load quantized models (safetensors + JSON, never pickle)."""

from .._lazy import lazy_exports

# public name -> its submodule, imported on first use (lowbit._lazy: no torch for a sibling's sake)
_WHERE = {
    "load_quantized": "model_io",
    "read_meta": "model_io",
    "save_quantized": "model_io",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
