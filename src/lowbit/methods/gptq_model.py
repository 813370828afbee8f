"""GPTQ over a whole model: Hessians collected block by block, each block fed what the quantized blocks
before it produce (the reference code's ``llama_sequential``, github.com/IST-DASLab/gptq ``llama.py``).

The calibration engine (``lowbit.calibration.engine``) catches the first block's inputs once for every batch;
then for each block: its linear layers' ``H = 2/n sum x^T x`` are summed over those inputs, its layers quantized
with ``gptq_quantize``, and the block run again with the quantized weights to give the next block's inputs.
Layers outside the blocks (a pooler, an unexcluded lm_head) are quantized from full forwards after the last
block, the model's weights as they were.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from ..calibration.carry import carried_stream, resumed_stream
from ..calibration.engine import Block, BlockPass, Consumer
from ..calibration.statistics import HESSIAN
from ..layers.rotation import rotate, rotate_hessian, unrotate
from ..layers.surgery import plan_layers
from ..planning.config import QuantConfig
from ..planning.plan import QuantPlan
from ..tensor import QuantizedTensor
from .gptq import GPTQResult, gptq_quantize

# Calibration windows of 512 tokens GPTQ runs by default: 32,768 tokens. The reference code takes 128 random
# 2048-token segments of C4 (github.com/IST-DASLab/gptq, datautils.py, nsamples=128); this model's protocol
# windows are 512 tokens, and the text after the scored windows is what calibration may read.
GPTQ_CALIBRATE = 64


class GPTQWeights(Consumer):
    """GPTQ's part in a walk: at each block, its layers' Hessians on what the quantized blocks before produce, the
    layers quantized, and the block run again with the quantized weights to give the next block's inputs. Layers
    outside the blocks are quantized from full forwards of the model as it is (earlier blocks unquantized).
    ``layers``: the layers whose config has ``+gptq``; ``results``: ``{layer name: GPTQResult}``."""

    def __init__(self, model: nn.Module, plan: QuantPlan, layers: frozenset[str], *, act_order: bool = False):
        self.targets = {names[0]: (linear, config) for names, linear, config, _ in plan_layers(model, plan)
                        if names[0] in layers}
        self.layers, self.act_order = tuple(self.targets), act_order
        self.results: dict[str, GPTQResult] = {}
        self._stream = None

    @property
    def weights(self) -> dict[str, QuantizedTensor]:
        return {name: r.qweight for name, r in self.results.items()}

    def take(self, names: Iterable[str]) -> dict[str, QuantizedTensor]:
        """The weights of ``names`` made so far, no longer kept here (a block's, once it is written)."""
        return {name: self.results.pop(name).qweight for name in names if name in self.results}

    def _quantize(self, name: str, hessians: dict[str, torch.Tensor]) -> None:
        """Layer ``name`` from its Hessian, taken out of ``hessians`` for ``gptq_layer`` to work in."""
        linear, config = self.targets[name]
        self.results[name] = gptq_layer(name, linear.weight, hessians.pop(name), config, act_order=self.act_order,
                                        consume=True)

    def block(self, engine: BlockPass, block: Block) -> None:
        if self._stream is None:
            self._stream = engine.stream()
        mine = block.layers(self.layers)
        saved = {}
        if mine:
            found, _ = block.statistics(self._stream, mine, [HESSIAN], outputs=False)
            hessians = found[HESSIAN]  # every Hessian was collected before any layer changed
            # layer by layer here, or all at once on a cluster; each Hessian given away with its unit and freed once
            # used (1.6 GB at 14336 in fp64)
            units = ((name, self.targets[name][0].weight.detach(), hessians.pop(name), self.targets[name][1])
                     for name in mine)
            for name, result in zip(mine, engine.pool.map(_gptq_unit, units, shared=(self.act_order,)), strict=True):
                self.results[name] = result
            for name, linear in mine.items():  # after the last GPTQ, so no float copy is alive during one
                config = self.targets[name][1]
                saved[name] = linear.weight.data  # the weight the layer now computes with, in its input's basis
                linear.weight.data = effective_weight(name, self.results[name].qweight, config).to(linear.weight.dtype)
        try:
            outputs = block.run(self._stream)  # what the quantized block passes on
        finally:
            for name, weight in saved.items():
                mine[name].weight.data = weight
        self._stream.advance(outputs)

    def tail(self, engine: BlockPass, layers: dict[str, nn.Module]) -> None:
        found = engine.tail(layers, [HESSIAN])[HESSIAN]
        for name in layers:
            self._quantize(name, found)

    def carried(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Its stream (what the quantized blocks so far pass on); the layers it made are taken at each block's end
        (``take``), written before the next block is read, and so not carried."""
        tensors, stream = carried_stream(self._stream)
        return tensors, {"stream": stream}

    def restore(self, engine: BlockPass, tensors, info: dict) -> None:
        self._stream = resumed_stream(engine, tensors, info["stream"])


def _gptq_unit(act_order: bool, name: str, weight: torch.Tensor, hessian: torch.Tensor,
               config: QuantConfig) -> GPTQResult:
    """One layer of a block as a unit of work (``BlockPass.pool``): its Hessian is the unit's own."""
    return gptq_layer(name, weight, hessian, config, act_order=act_order, consume=True)


def gptq_layer(name: str, weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig, *,
               act_order: bool = False, consume: bool = False) -> GPTQResult:
    """GPTQ of one layer's weight as ``config`` says; with ``+had`` on ``W Q`` against the rotated inputs'
    Hessian ``Q^T H Q`` (``lowbit.layers.rotation``), the signs drawn from the layer's name; with ``+cb`` the codebook
    refit to the output error between GPTQ rounds (``lowbit.methods.codebook_refit``). ``consume``: ``hessian`` is
    the caller's no longer and is worked in (left destroyed): two matrices of its size alive, not three."""
    weight = weight.detach()
    signs = config.layer_signs(name, weight.shape[1])
    if signs is not None:
        weight, hessian = rotate(weight, signs), rotate_hessian(hessian, signs, overwrite=consume)
        consume = True  # the rotated Hessian is this call's own
    refine = any(m.refines() for m in config.method_classes)  # +cb reads the Hessian again
    result = gptq_quantize(weight, hessian, config.format, block_size=config.block_size, search=config.search,
                           act_order=act_order, double_quant=config.double_quant,
                           overwrite_hessian=consume and not refine)
    for method in config.method_classes:  # +cb refits the codebook between GPTQ rounds
        result = method.refine(config, weight, hessian, result, lambda parts: gptq_quantize(
            weight, hessian, config.format, block_size=config.block_size, search=config.search, act_order=act_order,
            double_quant=config.double_quant, tensor_parts=parts))
    return result


def effective_weight(name: str, qweight, config: QuantConfig) -> torch.Tensor:
    """A quantized weight as its layer computes with it, float32 in the input's own basis (``+had`` undone)."""
    w = qweight.dequantize().float()
    signs = config.layer_signs(name, w.shape[1])
    return w if signs is None else unrotate(w, signs)
