"""Bits per weight as stored: a large zero tensor quantized with a label's settings, its bytes counted.

What `lowbit formats` prints and `lowbit memory` multiplies by a parameter count, counted there from the
facts (``formats.facts.Probe``, without torch); here the codecs store it: codes, block scales, second-level
scales and per-tensor constants, with no partial-block overhead (tests/formats/test_facts.py).
"""

from __future__ import annotations

import torch

from ..quantize import quantize
from ..tensor import QuantizedTensor
from .facts import Probe


def stored(p: Probe) -> QuantizedTensor:
    """Zeros of ``p``'s shape quantized with its settings: what is stored, byte for byte, for a large tensor."""
    return quantize(torch.zeros(*p.shape), p.format, block_size=p.block_size, double_quant=p.double_quant)
