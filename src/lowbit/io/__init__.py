"""lowbit.io: atomic writes; save and load quantized models (safetensors + JSON, never pickle)."""
