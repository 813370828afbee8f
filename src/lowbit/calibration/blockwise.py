"""Running a transformer block by block: its blocks, the inputs of the first one, layer Hessians.

GPTQ (``gptq_model``) and sensitivity (``sensitivity``) both feed each block what the one before it produced,
as the GPTQ reference code does (github.com/IST-DASLab/gptq, ``llama.py``, ``llama_sequential``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InputError


class _Caught(Exception):
    """Raised by the hook on the first block once its inputs are stored: the rest of the forward is not needed."""


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the longest nn.ModuleList holding linear layers."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)
             and any(isinstance(x, nn.Linear) for x in m.modules())]
    if not lists:
        raise InputError(f"{type(model).__name__} holds no nn.ModuleList of blocks: it cannot be run block by block")
    return max(lists, key=len)


def catch_inputs(model: nn.Module, first: nn.Module, batches: Sequence) -> list[tuple[tuple, dict]]:
    caught = []

    def hook(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Caught

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                with contextlib.suppress(_Caught):
                    call(model, batch)
    finally:
        handle.remove()
    return caught


def call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch, use_cache=False) if "input_ids" in batch and causal(model) else model(**batch)
    return model(batch, use_cache=False) if causal(model) else model(batch)


def causal(model: nn.Module) -> bool:
    return hasattr(model, "generation_config") or hasattr(model, "lm_head")


def first(out):
    return out[0] if isinstance(out, tuple) else out


def hessians(linears: dict[str, nn.Linear], run, dtype: torch.dtype = torch.float64) -> dict[str, torch.Tensor]:
    """``2/n sum x^T x`` of each layer's inputs over what ``run()`` feeds it, summed in float64; ``dtype``: that of
    each batch's product (float32 is several times faster where a search needs no more)."""
    sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(dtype)
            if not torch.isfinite(x).all():
                raise InputError(f"calibration activations of {name} hold NaN or Inf: GPTQ cannot use them")
            sums[name] += (x.T @ x).to(torch.float64)
            counts[name] += x.shape[0]
        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in linears.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    idle = [n for n, c in counts.items() if c == 0]
    if idle:
        raise InputError(f"nn.Linear {idle[0]} received no input during calibration: GPTQ has no Hessian for it")
    return {n: 2 * s / counts[n] for n, s in sums.items()}
