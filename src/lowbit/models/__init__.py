"""lowbit.models: load the embedded default model, a local directory, a .gguf file or a hub id."""

from .._lazy import lazy_exports

# public name -> its submodule, imported on first use (lowbit._lazy: no torch for a sibling's sake)
_WHERE = {
    "file_sha256": "hashing",
    "files_sha256": "hashing",
    "CAUSAL_LM": "loader",
    "ENCODER": "loader",
    "ModelInfo": "loader",
    "load_model": "loader",
    "resolve": "loader",
}
__all__ = sorted(_WHERE)
__getattr__, __dir__ = lazy_exports(__name__, _WHERE)
