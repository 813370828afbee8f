"""lowbit.io: atomic writes; save and load quantized models (safetensors + JSON, never pickle)."""

from .atomic import atomic_dir, atomic_file, write_json
from .model_io import load_quantized, read_meta, save_quantized

__all__ = ["atomic_dir", "atomic_file", "load_quantized", "read_meta", "save_quantized", "write_json"]
