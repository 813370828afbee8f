"""GPTQ over a whole model: Hessians collected block by block, each block fed what the quantized blocks
before it produce (the reference code's ``llama_sequential``, github.com/IST-DASLab/gptq ``llama.py``).

The inputs of the first transformer block are caught once for every calibration batch; then for each block:
its linear layers' ``H = 2/n sum x^T x`` are summed over those inputs, its layers quantized with
``gptq_quantize``, and the block run again with the quantized weights to give the next block's inputs.
Layers outside the blocks (a pooler, an unexcluded lm_head) are quantized from the activations that reach
them after the last block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ..calibration.blockwise import call, catch_inputs, first, hessians, transformer_blocks
from ..layers.rotation import layer_signs, rotate, rotate_hessian, unrotate
from ..layers.surgery import plan_layers
from ..planning.config import QuantConfig
from ..planning.plan import QuantPlan
from ..progress import progress_bar
from .codebook_refit import refit_rounds
from .gptq import GPTQResult, gptq_quantize

# Calibration windows of 512 tokens GPTQ runs by default: 32,768 tokens. The reference code takes 128 random
# 2048-token segments of C4 (github.com/IST-DASLab/gptq, datautils.py, nsamples=128); this model's protocol
# windows are 512 tokens, and the text after the scored windows is what calibration may read.
GPTQ_CALIBRATE = 64


def gptq_weights(model: nn.Module, plan: QuantPlan, batches: Sequence, *, act_order: bool = False,
                 progress: bool = True) -> dict[str, GPTQResult]:
    """``{layer name: GPTQResult}`` for every layer whose plan config has ``method="gptq"``; ``model`` is not
    changed. ``batches``: input-id tensors (or mappings of forward keyword arguments), as calibration feeds."""
    targets = {names[0]: (linear, config) for names, linear, config, _ in plan_layers(model, plan)
               if config.method == "gptq"}
    if not targets:
        return {}
    blocks = transformer_blocks(model)
    inputs = catch_inputs(model, blocks[0], batches)
    results: dict[str, GPTQResult] = {}

    def quantize(name: str, hessian: torch.Tensor) -> GPTQResult:
        linear, config = targets[name]
        return gptq_layer(name, linear.weight, hessian, config, act_order=act_order)

    def computed(name: str) -> torch.Tensor:
        """The weight layer ``name`` now computes with, in its input's own basis."""
        linear, config = targets[name]
        return effective_weight(name, results[name].qweight, config).to(linear.weight.dtype)

    names = {id(m): n for n, m in model.named_modules()}
    with progress_bar(len(targets), "GPTQ", enabled=progress) as advance, torch.inference_mode():
        for block in blocks:
            mine = {names[id(m)]: m for m in block.modules() if names.get(id(m)) in targets}
            found = hessians(mine, lambda block=block, inputs=inputs: [block(*a, **k) for a, k in inputs])
            saved = {}
            for name, linear in mine.items():
                results[name] = quantize(name, found[name])
                saved[name] = linear.weight.data
                linear.weight.data = computed(name)
                advance()
            try:
                outs = [first(block(*a, **k)) for a, k in inputs]  # what the quantized block passes on
            finally:
                for name, weight in saved.items():
                    mine[name].weight.data = weight
            inputs = [((out, *a[1:]), k) for out, (a, k) in zip(outs, inputs, strict=True)]
        rest = {n: targets[n][0] for n in targets if n not in results}
        if rest:  # outside the blocks: their inputs from full forwards (earlier blocks' weights unchanged)
            found = hessians(rest, lambda: [call(model, b) for b in batches])
            for name in rest:
                results[name] = quantize(name, found[name])
                advance()
    return results


def gptq_layer(name: str, weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, *,
               act_order: bool = False) -> GPTQResult:
    """GPTQ of one layer's weight as ``config`` says; with ``+had`` on ``W Q`` against the rotated inputs'
    Hessian ``Q^T H Q`` (``lowbit.layers.rotation``), the signs drawn from the layer's name; with ``+cb`` the codebook
    refit to the output error between GPTQ rounds (``lowbit.methods.codebook_refit``)."""
    weight = weight.detach()
    if config.rotate:
        signs = layer_signs(name, weight.shape[1])
        weight, hessian = rotate(weight, signs), rotate_hessian(hessian, signs)
    result = gptq_quantize(weight, hessian, config.format, block_size=config.block_size, search=config.search,
                           act_order=act_order, double_quant=config.double_quant)
    if config.refit_codebook:
        result = refit_rounds(weight, hessian, result, lambda parts: gptq_quantize(
            weight, hessian, config.format, block_size=config.block_size, search=config.search, act_order=act_order,
            double_quant=config.double_quant, tensor_parts=parts))
    return result


def effective_weight(name: str, qweight, config: QuantConfig) -> torch.Tensor:
    """A quantized weight as its layer computes with it, float32 in the input's own basis (``+had`` undone)."""
    w = qweight.dequantize().float()
    return unrotate(w, layer_signs(name, w.shape[1])) if config.rotate else w
