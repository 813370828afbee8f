"""GPTQ over a whole model: Hessians collected block by block, each block fed what the quantized blocks
before it produce (the reference code's ``llama_sequential``, github.com/IST-DASLab/gptq ``llama.py``).

The inputs of the first transformer block are caught once for every calibration batch; then for each block:
its linear layers' ``H = 2/n sum x^T x`` are summed over those inputs, its layers quantized with
``gptq_quantize``, and the block run again with the quantized weights to give the next block's inputs.
Layers outside the blocks (a pooler, an unexcluded lm_head) are quantized from the activations that reach
them after the last block.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..progress import progress_bar
from .gptq import GPTQResult, gptq_quantize
from .plan import QuantPlan
from .surgery import plan_layers

# Calibration windows of 512 tokens GPTQ runs by default: 32,768 tokens. The reference code takes 128 random
# 2048-token segments of C4 (github.com/IST-DASLab/gptq, datautils.py, nsamples=128); this model's protocol
# windows are 512 tokens, and the text after the scored windows is what calibration may read.
GPTQ_CALIBRATE = 64


class _Caught(Exception):
    """Raised by the hook on the first block once its inputs are stored: the rest of the forward is not needed."""


def gptq_weights(model: nn.Module, plan: QuantPlan, batches: Sequence, *, act_order: bool = False,
                 progress: bool = True) -> dict[str, GPTQResult]:
    """``{layer name: GPTQResult}`` for every layer whose plan config has ``method="gptq"``; ``model`` is not
    changed. ``batches``: input-id tensors (or mappings of forward keyword arguments), as calibration feeds."""
    targets = {names[0]: (linear, config) for names, linear, config, _ in plan_layers(model, plan)
               if config.method == "gptq"}
    if not targets:
        return {}
    blocks = _blocks(model)
    inputs = _catch_inputs(model, blocks[0], batches)
    results: dict[str, GPTQResult] = {}

    def quantize(name: str, hessian: torch.Tensor) -> GPTQResult:
        linear, config = targets[name]
        return gptq_quantize(linear.weight, hessian, config.format, block_size=config.block_size,
                             search=config.search, act_order=act_order)

    names = {id(m): n for n, m in model.named_modules()}
    with progress_bar(len(targets), "GPTQ", enabled=progress) as advance, torch.inference_mode():
        for block in blocks:
            mine = {names[id(m)]: m for m in block.modules() if names.get(id(m)) in targets}
            hessians = _hessians(mine, lambda block=block, inputs=inputs: [block(*a, **k) for a, k in inputs])
            saved = {}
            for name, linear in mine.items():
                results[name] = quantize(name, hessians[name])
                saved[name] = linear.weight.data
                linear.weight.data = results[name].qweight.dequantize().to(linear.weight.dtype)
                advance()
            try:
                outs = [_first(block(*a, **k)) for a, k in inputs]  # what the quantized block passes on
            finally:
                for name, weight in saved.items():
                    mine[name].weight.data = weight
            inputs = [((out, *a[1:]), k) for out, (a, k) in zip(outs, inputs, strict=True)]
        rest = {n: targets[n][0] for n in targets if n not in results}
        if rest:  # outside the blocks: their inputs from full forwards (earlier blocks' weights unchanged)
            hessians = _hessians(rest, lambda: [_call(model, b) for b in batches])
            for name in rest:
                results[name] = quantize(name, hessians[name])
                advance()
    return results


def _blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the longest nn.ModuleList holding linear layers."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)
             and any(isinstance(x, nn.Linear) for x in m.modules())]
    if not lists:
        raise ValueError("GPTQ runs a model block by block and found no nn.ModuleList of blocks in it")
    return max(lists, key=len)


def _catch_inputs(model: nn.Module, first: nn.Module, batches: Sequence) -> list[tuple[tuple, dict]]:
    caught = []

    def hook(module, args, kwargs):
        caught.append((args, kwargs))
        raise _Caught

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.inference_mode():
            for batch in batches:
                with contextlib.suppress(_Caught):
                    _call(model, batch)
    finally:
        handle.remove()
    return caught


def _call(model: nn.Module, batch):
    if isinstance(batch, dict):
        return model(**batch, use_cache=False) if "input_ids" in batch and _causal(model) else model(**batch)
    return model(batch, use_cache=False) if _causal(model) else model(batch)


def _causal(model: nn.Module) -> bool:
    return hasattr(model, "generation_config") or hasattr(model, "lm_head")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _hessians(linears: dict[str, nn.Linear], run) -> dict[str, torch.Tensor]:
    """``2/n sum x^T x`` (float64) of each layer's inputs over what ``run()`` feeds it."""
    sums = {n: torch.zeros(m.in_features, m.in_features, dtype=torch.float64) for n, m in linears.items()}
    counts = dict.fromkeys(linears, 0)

    def hook_for(name):
        def hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).to(torch.float64)
            if not torch.isfinite(x).all():
                raise ValueError(f"calibration activations of {name} hold NaN or Inf: GPTQ cannot use them")
            sums[name] += x.T @ x
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
        raise ValueError(f"nn.Linear {idle[0]} received no input during calibration: GPTQ has no Hessian for it")
    return {n: 2 * s / counts[n] for n, s in sums.items()}
