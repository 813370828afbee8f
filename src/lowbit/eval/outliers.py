"""LLM.int8()'s outlier analysis (``lowbit outliers``): which input features of each nn.Linear reach |x| >= a
threshold on the calibration text, and which are systematic (Dettmers et al., arXiv 2208.07339, §4.1).

The paper's criteria, for a feature dimension of the hidden states (width ``hidden_size``): a magnitude of at
least 6, in the same dimension in at least 25% of the transformer layers, and in at least 6% of the sequence
positions across all those hidden states. As the paper does, only the inputs of width ``hidden_size`` inside a
numbered block count (the attention projections and the FFN expansion; the FFN contraction's input has the
intermediate width), and an input read by several layers (q/k/v, gate/up) counts once. A feature's position
share is pooled: positions where it reaches the threshold, summed over those inputs, over their positions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration.engine import Block, BlockPass, Consumer, serve
from ..calibration.importance import linear_layers
from ..calibration.statistics import OUTLIERS
from ..errors import InputError

if TYPE_CHECKING:
    from ..models.lazy import LazyWeights

SYSTEMATIC_LAYERS = 0.25  # §4.1: the same feature dimension in at least 25% of the transformer layers
SYSTEMATIC_POSITIONS = 0.06  # §4.1: and in at least 6% of the sequence positions


@dataclass
class LayerInput:
    """What one nn.Linear saw: per input feature, the positions with |x| >= threshold and the largest |x|."""

    in_features: int
    block: int | None  # the transformer block its name numbers (model.layers.3.mlp.up_proj: 3), None outside one
    shares_input_with: str | None  # the layer whose input tensor it also reads (k_proj: q_proj)
    positions: int
    counts: torch.Tensor = field(repr=False)  # (in_features,) int64
    peak: torch.Tensor = field(repr=False)  # (in_features,) float32


def check_analysis_threshold(threshold: float, name: str = "the outlier threshold") -> float:
    """``threshold`` if it is a finite number > 0 (0 would count every value), else a ValueError saying ``name``."""
    if not threshold > 0 or threshold == float("inf"):
        raise InputError(f"{name} is a finite number > 0 (the paper's is 6), got {threshold}")
    return threshold


def block_index(name: str) -> int | None:
    return next((int(part) for part in name.split(".") if part.isdigit()), None)


def collect_outliers(model: nn.Module, batches: Sequence, threshold: float, *, weights: LazyWeights | None = None,
                     progress: bool = True, label: str = "finding outliers") -> dict[str, LayerInput]:
    """``{layer name: LayerInput}`` for every nn.Linear over ``batches`` (``calibration.collect_importance``'s
    inputs; padded tokens left out), the model walked block by block (``lowbit.calibration.engine``). ``weights``:
    ``model`` was built on the meta device (``lowbit.models.lazy.load_lazily``) and is read from them one block at a
    time; the counts are those of the model in memory. A NaN or Inf activation is a ValueError naming the layer."""
    check_analysis_threshold(threshold)
    layers = linear_layers(model)
    counter = _Counter(layers, threshold)
    serve(model, batches, [counter], progress=progress, label=label, weights=weights)
    return {name: LayerInput(m.in_features, block_index(name), **vars(counter.found[name]))
            for name, m in layers.items()}


class _Counter(Consumer):
    """``OUTLIERS`` of ``layers`` (names) at ``threshold``, in ``found``."""

    def __init__(self, layers, threshold: float):
        self.layers, self.threshold, self.found, self._stream = tuple(layers), threshold, {}, None

    def block(self, engine: BlockPass, block: Block) -> None:
        if self._stream is None:
            self._stream = engine.stream()
        found, outputs = block.statistics(self._stream, block.layers(self.layers), [OUTLIERS],
                                          threshold=self.threshold)
        self.found.update(found[OUTLIERS])
        self._stream.advance(outputs)

    def tail(self, engine: BlockPass, layers: dict[str, nn.Module]) -> None:
        self.found.update(engine.tail(layers, [OUTLIERS], replay=self._stream, threshold=self.threshold)[OUTLIERS])


def outlier_report(stats: dict[str, LayerInput], threshold: float, hidden_size: int | None) -> dict:
    """The JSON ``lowbit outliers`` writes: every layer's outlier dimensions, and per hidden-state feature the
    share of layers and positions it reaches the threshold in, with the paper's verdict (module docstring)."""
    layers = []
    for name, s in stats.items():
        dims = s.counts.nonzero().flatten().tolist()
        layers.append({"name": name, "in_features": s.in_features, "block": s.block, "positions": s.positions,
                       "shares_input_with": s.shares_input_with,
                       "dims": [{"dim": d, "positions": int(s.counts[d]), "share": int(s.counts[d]) / s.positions,
                                 "max_abs": float(s.peak[d])} for d in dims]})
    if hidden_size is None:  # the most common input width inside blocks
        widths = [s.in_features for s in stats.values() if s.block is not None]
        hidden_size = max(set(widths), key=widths.count) if widths else None
    hidden = {n: s for n, s in stats.items()
              if s.block is not None and s.in_features == hidden_size and s.shares_input_with is None}
    blocks = sorted({s.block for s in hidden.values()})
    features = []
    if hidden:
        counts = torch.stack([s.counts for s in hidden.values()])  # (inputs, hidden_size)
        peak = torch.stack([s.peak for s in hidden.values()]).amax(0)
        in_block = torch.tensor([s.block for s in hidden.values()])
        positions = sum(s.positions for s in hidden.values())
        for d in (counts.sum(0) > 0).nonzero().flatten().tolist():
            n_blocks = len(set(in_block[counts[:, d] > 0].tolist()))
            share = int(counts[:, d].sum()) / positions
            layer_share = n_blocks / len(blocks)
            features.append({"dim": d, "layers": n_blocks, "layer_share": layer_share, "position_share": share,
                             "max_abs": float(peak[d]),
                             "systematic": layer_share >= SYSTEMATIC_LAYERS and share >= SYSTEMATIC_POSITIONS})
        features.sort(key=lambda f: (-f["systematic"], -f["layer_share"], -f["position_share"], f["dim"]))
    return {"threshold": threshold, "hidden_size": hidden_size, "blocks": len(blocks),
            "criteria": {"layer_share": SYSTEMATIC_LAYERS, "position_share": SYSTEMATIC_POSITIONS},
            "hidden_inputs": list(hidden), "layers": layers, "features": features,
            "systematic": [f["dim"] for f in features if f["systematic"]]}
