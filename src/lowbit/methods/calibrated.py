"""Every calibrated method of a plan in one block-by-block pass, and one layer rounded from its Hessian as its
config says.

Each method the plan's labels name brings its own part of the pass (``Method.consumer``); at each block they run
in order (``lowbit.calibration.engine.serve``): first the methods that change the model (``+awq`` folds its
scales into the block), then the importance an activation-weighted search rounds with (``@amse``), then the
others in label order (``+gptq``), so the importance and GPTQ's Hessians are the scaled inputs', exactly as when
each ran as its own pass over the folded model (``tests/methods/test_calibrated.py`` holds the results to the
bit). Each keeps its own stream of one block's inputs: AWQ passes on the block's outputs from before its fold,
the importance those of the folded block, GPTQ those of the quantized block.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration.engine import serve
from ..calibration.importance import Importance, collect_importance
from ..cluster.pool import SERIAL, Pool
from ..errors import InputError
from ..layers.surgery import plan_layers, rounded_layer
from ..pipeline import needs_calibration
from ..planning.config import QuantConfig
from ..planning.plan import QuantPlan
from ..tensor import QuantizedTensor
from .registry import BLOCK, method_for, ordered

if TYPE_CHECKING:
    from ..files.partial import ProducerState
    from ..models.lazy import LazyWeights


@dataclass
class Calibrated:
    """What one pass gives: the importance ``{layer: (in,) float32}`` and the weights the methods that
    ``prequantize`` made, ``{layer: quantized weight}``; each empty where the plan did not ask for it. A method
    that changes the model (``+awq``) has changed it in place and recorded so on it."""

    importance: dict[str, torch.Tensor] = field(default_factory=dict)
    prequantized: dict[str, QuantizedTensor] = field(default_factory=dict)


def method_layers(model: nn.Module, plan: QuantPlan) -> dict[type, frozenset[str]]:
    """``{method class: the layers whose config names it}`` for every method of ``plan``, in label order; each
    layer by its first name (as ``named_modules()`` gives it)."""
    found: dict[str, set[str]] = {}
    for names, _, config, _ in plan_layers(model, plan):
        for suffix in config.methods:
            found.setdefault(suffix, set()).add(names[0])
    return {method_for(s): frozenset(found[s]) for s in ordered(found)}


def calibrate_methods(model: nn.Module, plan: QuantPlan, batches: Sequence, *, importance_layers: Sequence[str] = (),
                      importance_batches: Sequence | None = None, progress: bool = True,
                      weights: LazyWeights | None = None,
                      on_block: Callable[[list[str], Calibrated], None] | None = None,
                      at_boundary: Callable[[ProducerState], None] | None = None,
                      resumed: ProducerState | None = None, pool: Pool = SERIAL) -> Calibrated:
    """Every method of ``plan`` that calibrates (changing ``model`` in place where one does), and the importance
    of ``importance_layers``, in one pass of ``model`` on ``batches``. ``importance_batches``: the importance's
    own inputs (default ``batches``); served in the same pass when they are the first of ``batches`` (a causal
    LM's windows: the default 16 are the first 16 of GPTQ's 64), else by a pass of their own after it.

    ``weights``: ``model`` is on the meta device and read block by block (``lowbit.calibration.engine.serve``);
    ``on_block(layers, found)``: called after each block with the plan's layers in it and what the pass found
    for them (the made weights are no longer kept here), while the block's weights are read in, so that they are
    rounded and written before the next block is read; the result then holds what no block took. Together they
    need the importance served in the pass. ``at_boundary`` and ``resumed``: the pass continued from a block's
    end (``lowbit.calibration.engine.serve``; the consumers are the same, in the same order, for the same plan).
    ``pool``: where one block's layers are worked on (``lowbit.cluster.pool``)."""
    parts = [(m, c) for m, layers in method_layers(model, plan).items()
             if (c := m.consumer(model, plan, layers)) is not None]
    importance_batches = batches if importance_batches is None else importance_batches
    shared = importance_layers and leads(importance_batches, batches)
    if on_block is not None and importance_layers and not shared:
        raise InputError("the importance is not served in the calibration pass: the model cannot be rounded block "
                         "by block")
    importance = Importance(importance_layers, len(importance_batches)) if shared else None
    first = [(m.suffix, c) for m, c in parts if m.needs == BLOCK]  # they change the blocks the others read
    rest = [(m.suffix, c) for m, c in parts if m.needs != BLOCK]
    consumers = [*first, *([("importance", importance)] if importance is not None else []), *rest]
    makers = [c for m, c in parts if m.prequantizes]
    targets = [names[0] for names, _, _, _ in plan_layers(model, plan)]

    def after_block(block) -> None:
        for _, consumer in first:  # what the methods that change the model did so far, recorded on it (``finish``
            consumer.finish(progress=False)  # merges; its call after the pass says what could not be done)
        layers = list(block.layers(targets))
        found = Calibrated({n: importance.found[n] for n in layers if n in importance.found} if importance else {},
                           {n: q for maker in makers for n, q in maker.take(layers).items()})
        on_block(layers, found)

    if consumers or on_block is not None:
        label = f"calibrating ({', '.join(what for what, _ in consumers)})" if consumers else "quantizing"
        serve(model, batches, [c for _, c in consumers], progress=progress, label=label, weights=weights,
              after_block=after_block if on_block is not None else None, keep=_kept(model, plan, targets),
              at_boundary=at_boundary, resumed=resumed, pool=pool)
    out = Calibrated()
    for _, consumer in consumers:
        consumer.finish(progress=progress)
    if importance is not None:
        out.importance = {name: importance.found[name] for name in importance.layers}
    elif importance_layers:
        out.importance = collect_importance(model, importance_batches, layers=list(importance_layers),
                                            progress=progress)
    for method, consumer in parts:
        if method.prequantizes:
            out.prequantized.update(consumer.weights)
    return out


def _kept(model: nn.Module, plan: QuantPlan, targets: list[str]) -> set[str]:
    """The weights of the linear layers a plan leaves alone, where its methods change the model (``+awq`` may fold
    scales into one): read block by block, they stay as changed until written."""
    if not any(m.needs == BLOCK for c in plan.configs for m in c.method_classes):
        return set()
    rounded = set(targets)
    return {f"{n}.weight" for n, m in model.named_modules() if type(m) is nn.Linear and n not in rounded}


def layer_from_hessian(name: str, weight: torch.Tensor, hessian: torch.Tensor, config: QuantConfig) -> QuantizedTensor:
    """Layer ``name``'s weight rounded as ``config`` says, given its inputs' Hessian ``H = 2/n X^T X``: by the
    method that makes it (``+gptq``), else on its own, an activation-weighted search with H's diagonal / 2 (the
    calibration mean of x^2) as its importance."""
    maker = next((m for m in config.method_classes if m.prequantizes), None)
    if maker is not None:
        return maker.quantize_layer(name, weight, hessian, config)
    importance = (hessian.diagonal() / 2).float() if needs_calibration(config.search) else None
    return rounded_layer(name, weight, config, importance)[0]


def leads(short: Sequence, long: Sequence) -> bool:
    """Whether ``short`` are the first batches of ``long``, tensor for tensor."""
    def same(a, b) -> bool:
        if isinstance(a, Mapping):
            return isinstance(b, Mapping) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return len(short) <= len(long) and all(same(a, b) for a, b in zip(short, long, strict=False))
