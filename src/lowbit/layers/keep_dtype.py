"""The dtype of the tensors quantization leaves alone (embeddings, norms, biases): ``--keep-dtype``.

A saved model stores them in this dtype; ``lowbit compare`` rounds them the same way before
scoring (computing in float32, as the reloaded model does), so the KL it reports includes
what the narrower dtype costs.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

KEEP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_keep_dtype(name: str) -> torch.dtype:
    if name not in KEEP_DTYPES:
        raise InputError(f"--keep-dtype must be one of {', '.join(KEEP_DTYPES)}, got {name!r}")
    return KEEP_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in KEEP_DTYPES.items() if v == dtype)


def round_state(model: nn.Module, dtype: torch.dtype) -> int:
    """Round every floating tensor of ``model.state_dict()`` through ``dtype``, in place (packed
    QuantLinear parts are not in it). Returns the bytes this saves when stored in ``dtype``;
    a tensor reachable under two names (tied) counts once."""
    saved, seen = 0, set()
    for t in model.state_dict(keep_vars=True).values():
        if not t.is_floating_point() or t.dtype == dtype or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        with torch.no_grad():
            t.copy_(t.to(dtype))
        saved += t.numel() * (t.element_size() - dtype.itemsize)
    return saved
