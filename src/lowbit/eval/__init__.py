"""lowbit.eval: the evaluation protocol, cached references, and scores against them."""

from .._lazy import lazy_exports

# public name -> its submodule, imported on first use (lowbit._lazy: no torch for a sibling's sake)
_WHERE = {
    "score_causal": "causal",
    "encoder_reference": "encoder",
    "score_encoder": "encoder",
    "Protocol": "protocol",
    "read_text": "protocol",
    "token_windows": "protocol",
    "Reference": "reference",
    "causal_reference": "reference",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
