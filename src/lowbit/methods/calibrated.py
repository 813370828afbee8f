"""Every calibrated method of a plan in one block-by-block pass: AWQ's fold, the importance an activation-weighted
search rounds with (``@amse``), and GPTQ's weights.

At each block the consumers run in label order (``lowbit.calibration.engine.serve``): AWQ folds its scales into the
block first, so the importance and GPTQ's Hessians are the scaled inputs', exactly as when each ran as its own
pass over the folded model (``tests/methods/test_calibrated.py`` holds the results to the bit). Each keeps its own
stream of one block's inputs: AWQ passes on the block's outputs from before its fold, the importance those of the
folded block, GPTQ those of the quantized block.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration.engine import serve
from ..calibration.importance import Importance, collect_importance
from ..layers.surgery import plan_layers
from ..planning.plan import QuantPlan
from ..tensor import QuantizedTensor
from .awq import AWQScales
from .awq_method import AWQ
from .gptq_method import GPTQ
from .gptq_model import GPTQWeights


@dataclass
class Calibrated:
    """What one pass gives: AWQ's ``{layer: s}`` (the model is folded), the importance ``{layer: (in,) float32}``
    and GPTQ's ``{layer: quantized weight}``; each empty where the plan did not ask for it."""

    scales: dict[str, torch.Tensor] = field(default_factory=dict)
    importance: dict[str, torch.Tensor] = field(default_factory=dict)
    prequantized: dict[str, QuantizedTensor] = field(default_factory=dict)


def calibrate_methods(model: nn.Module, plan: QuantPlan, batches: Sequence, *, importance_layers: Sequence[str] = (),
                      importance_batches: Sequence | None = None, progress: bool = True) -> Calibrated:
    """AWQ's fold (in place), the importance of ``importance_layers`` and GPTQ's weights for ``plan``, in one pass
    of ``model`` on ``batches``. ``importance_batches``: the importance's own inputs (default ``batches``); served
    in the same pass when they are the first of ``batches`` (a causal LM's windows: the default 16 are the first 16
    of GPTQ's 64), else by a pass of their own after the fold."""
    configs = [config for _, _, config, _ in plan_layers(model, plan)]
    awq = AWQScales(model, plan) if any(AWQ.suffix in c.methods for c in configs) else None
    gptq = GPTQWeights(model, plan) if any(GPTQ.suffix in c.methods for c in configs) else None
    importance_batches = batches if importance_batches is None else importance_batches
    shared = importance_layers and _leads(importance_batches, batches)
    importance = Importance(importance_layers, len(importance_batches)) if shared else None
    consumers = [c for c in (awq, importance, gptq) if c is not None]
    out = Calibrated()
    if consumers:
        what = ", ".join(w for w, c in (("+awq", awq), ("importance", importance), ("+gptq", gptq)) if c)
        serve(model, batches, consumers, progress=progress, label=f"calibrating ({what})")
    if awq is not None:
        awq.finish(model, progress=progress)
        out.scales = awq.applied
    if importance is not None:
        out.importance = {name: importance.found[name] for name in importance.layers}
    elif importance_layers:
        out.importance = collect_importance(model, importance_batches, layers=list(importance_layers),
                                            progress=progress)
    if gptq is not None:
        out.prequantized = {name: r.qweight for name, r in gptq.results.items()}
    return out


def _leads(short: Sequence, long: Sequence) -> bool:
    """Whether ``short`` are the first batches of ``long``, tensor for tensor."""
    def same(a, b) -> bool:
        if isinstance(a, Mapping):
            return isinstance(b, Mapping) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    return len(short) <= len(long) and all(same(a, b) for a, b in zip(short, long, strict=False))
