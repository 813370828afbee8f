"""Bits per weight of a label from the format facts alone, without torch.

`lowbit memory` and the `lowbit formats` table print what the codecs store for a large tensor
(``lowbit.formats.probe``); quantizing one needs torch (1.3 s to import), so these commands count the
same bytes from the facts: the element codes packed across the tensor, what each family stores
per block (docs/formats.md; each codec's ``ANATOMY`` describes the same fields in words) and per tensor.
tests/formats/test_facts.py checks every registered format against the probe, so the two agree.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..scaling.dq_layout import DQ_BLOCK
from .registry import get_format
from .spec import FormatSpec
from .table import fact

if TYPE_CHECKING:
    from ..planning.config import QuantConfig

FP32_BITS = 32
# Bits stored per block besides the codes, where the table gives no block_bytes: an fp32 scale,
# plus a uint8 zero point for int_asym (the fields of each family's Codec.ANATOMY).
_BLOCK_SCALE_BITS = {"int": 32, "int_asym": 32 + 8, "codebook": 32, "minifloat": 32, "ternary": 32, "learned": 32,
                     "cast": 0}
# Bits stored once per tensor: NVFP4's fp32 tensor scale g; a learned codebook's 2^bits fp32 levels.
_TENSOR_BITS = {"nvfp4": lambda bits: FP32_BITS, "learned": lambda bits: 2**bits * FP32_BITS}

# The probe tensor (lowbit.formats.probe): 64 rows of 4096 hold whole blocks of every format, so no
# partial-block overhead; a label with a large block is measured on at least _PROBE_BLOCKS of its
# blocks, while that stays under _PROBE_MAX weights, so one partial block does not distort its bits.
PROBE_SHAPE = (64, 4096)
_PROBE_BLOCKS, _PROBE_MAX = 16, 2**24


def probe_shape(block: int) -> tuple[int, int]:
    """The shape of the tensor a label with blocks of ``block`` weights is measured on."""
    rows, cols = PROBE_SHAPE
    if block * _PROBE_BLOCKS > rows * cols:
        rows = max(rows, min(_PROBE_MAX, block * _PROBE_BLOCKS) // cols)
    return rows, cols


def stored_bits(name: str, numel: int, block: int, *, double_quant: bool = False) -> int:
    """Bits ``name`` stores for ``numel`` weights in blocks of ``block`` (the last one may be short)."""
    f = fact(name)
    n_blocks = math.ceil(numel / block)
    if f.block_bytes is not None:  # GGUF, MX, NVFP4: codes and scales inside a fixed block
        per_tensor = _TENSOR_BITS.get(f.family, lambda bits: 0)(f.bits)
        return n_blocks * 8 * f.block_bytes + per_tensor
    codes = 8 * math.ceil(f.bits * numel / 8)  # packed across the tensor
    scales = n_blocks * _BLOCK_SCALE_BITS[f.family]
    if double_quant:  # 8-bit codes of the fp32 scales, an fp32 absmax per DQ_BLOCK of them, an fp32 mean
        scales = n_blocks * 8 + math.ceil(n_blocks / DQ_BLOCK) * FP32_BITS + FP32_BITS
    return codes + scales + _TENSOR_BITS.get(f.family, lambda bits: 0)(f.bits)


def bits_per_weight(name: str, block: int | None = None, *, double_quant: bool = False) -> float:
    """Stored bits per weight of format ``name`` (blocks of ``block``, default the format's) on the
    probe tensor: what ``lowbit.formats.probe.stored`` stores for the same label."""
    block = block or fact(name).block
    rows, cols = probe_shape(block)
    return stored_bits(name, rows * cols, block, double_quant=double_quant) / (rows * cols)


@dataclass(frozen=True)
class Probe:
    """What a label stores for the probe tensor (``lowbit.formats.probe`` quantizes it), counted from the facts."""

    format: FormatSpec
    block_size: int
    double_quant: bool

    @property
    def shape(self) -> tuple[int, int]:
        return probe_shape(self.block_size)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def bits_per_weight(self) -> float:
        return bits_per_weight(self.format.name, self.block_size, double_quant=self.double_quant)


def probe(config: QuantConfig) -> Probe:
    """``config``'s probe: its format, block (LLM.int8(): one row) and double quantization. What `lowbit
    formats`, the plots and the tables give as a label's bits per weight."""
    spec = get_format(config.format)
    block = PROBE_SHAPE[1] if config.outlier_threshold is not None else config.block_size or spec.default_block_size
    return Probe(spec, block, config.double_quant)
