"""lowbit.models: load the embedded default model, a local directory, a .gguf file or a hub id."""

from .hashing import file_sha256, files_sha256
from .loader import CAUSAL_LM, ENCODER, ModelInfo, load_model, resolve

__all__ = ["CAUSAL_LM", "ENCODER", "ModelInfo", "file_sha256", "files_sha256", "load_model", "resolve"]
