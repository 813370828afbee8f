"""Bits per weight as stored: a large zero tensor quantized with a label's settings, its bytes counted.

What `lowbit formats` prints and `lowbit memory` multiplies by a parameter count: codes, block
scales, second-level scales and per-tensor constants, with no partial-block overhead.
"""

from __future__ import annotations

import torch

from ..planning.config import QuantConfig
from ..quantize import quantize
from ..tensor import QuantizedTensor
from .facts import PROBE_SHAPE, probe_shape
from .registry import get_format


def probe(config: QuantConfig) -> QuantizedTensor:
    """Zeros quantized with ``config``'s settings: what is stored, byte for byte, for a large tensor."""
    spec = get_format(config.format)
    block = config.block_size or spec.default_block_size
    if config.outlier_threshold is not None:  # LLM.int8(): one scale per row
        block = PROBE_SHAPE[1]
    return quantize(torch.zeros(*probe_shape(block)), spec, block_size=block, double_quant=config.double_quant)


def measured_bits_per_weight(label: str) -> float:
    """Stored bits per weight of a ``FORMAT[/BLOCK][+dq]`` label."""
    return probe(QuantConfig.parse(label)).bits_per_weight
