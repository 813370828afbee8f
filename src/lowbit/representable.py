"""Finite input a format cannot hold: stored scales or dequantized values that overflow.

Every codec decodes a block as (element value) x (block scale), so a block's largest
decoded magnitude follows from its stored scales: a codec's ``peak(spec, parts)`` returns
it per block, (n_blocks,) float32, computed with decode's own float32 arithmetic (NaN or
inf where a stored scale is not finite). It is exact where the encoder always uses the
block's extreme code (absmax scales, GGUF's signed max and range) and an upper bound
otherwise; a codec whose ``peak`` returns None is decoded in full. Checking those few numbers per
block after encoding costs far less than scanning the input again.

A value overflows the input's dtype when it reaches ``overflow_threshold``: the dtype's
largest finite value plus half an ulp, where IEEE round-to-nearest-even goes to inf.
"""

from __future__ import annotations

import math
from functools import cache

import torch

from .errors import UnrepresentableError
from .formats.registry import codec_for
from .formats.spec import FormatSpec
from .pipeline import encode_parts
from .tensor import QuantizedTensor

_BITS_AS_INT = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def overflow_threshold(dtype: torch.dtype) -> float:
    """The smallest float32 magnitude that rounds to inf in ``dtype`` (float32 itself: inf).

    finfo.max has an odd last mantissa bit, so the tie half an ulp above it goes to inf.
    """
    if dtype == torch.float32:
        return math.inf
    fi = torch.finfo(dtype)
    ulp = fi.eps * 2.0 ** math.floor(math.log2(fi.max))
    return fi.max + ulp / 2  # float16: 65520; bfloat16: 0x1.ffp127, both exact in float32


def block_peaks(spec: FormatSpec, parts: dict[str, torch.Tensor], n: int, block: int) -> torch.Tensor:
    """parts of n elements (no double quant) -> (n_blocks,) float32 largest decoded |value|."""
    peaks = codec_for(spec).peak(spec, parts)
    if peaks is not None:
        return peaks
    out = QuantizedTensor(spec, torch.Size([n]), torch.float32, block, parts).dequantize()  # (n,)
    n_blocks = -(-n // block)
    padded = torch.zeros(n_blocks * block, dtype=torch.float32)
    padded[:n] = out
    return padded.view(n_blocks, block).abs().amax(dim=1)


def first_overflow(peaks: torch.Tensor, dtype: torch.dtype) -> int | None:
    """Index of the first block whose peak is not finite in ``dtype``, or None."""
    limit = overflow_threshold(dtype)
    if bool(peaks.amax() < limit):  # one reduction; NaN propagates and compares False
        return None
    return int((~(peaks < limit)).nonzero()[0])


def holds(spec: FormatSpec, parts: dict[str, torch.Tensor], n: int, block: int, dtype: torch.dtype) -> bool:
    """Whether every block decodes finite in ``dtype``: a codec's ``peak_max`` (the largest
    peak, from one pass over its scales) where it has one, else the per-block peaks."""
    top = codec_for(spec).peak_max(spec, parts)
    if top is not None:
        return bool(top < overflow_threshold(dtype))  # NaN compares False
    return first_overflow(block_peaks(spec, parts, n, block), dtype) is None


def check_representable(
    spec: FormatSpec,
    parts: dict[str, torch.Tensor],
    flat: torch.Tensor,
    *,
    shape: torch.Size,
    dtype: torch.dtype,
    block: int,
    double_quant: bool = False,
) -> None:
    """Raise UnrepresentableError naming the first block of ``flat`` (the input as float32)
    whose stored scale or dequantized values overflow ``dtype``. With ``double_quant``,
    ``parts["scales"]`` holds the scales as double quantization gives them back."""
    if holds(spec, parts, flat.numel(), block, dtype):
        return
    peaks = block_peaks(spec, parts, flat.numel(), block)
    b = first_overflow(peaks, dtype)
    start, stop = b * block, min((b + 1) * block, flat.numel())
    where = (
        f"block {b} (x.flatten()[{start}:{stop}], x[{_index(start, shape)}] to x[{_index(stop - 1, shape)}], "
        f"max |x| {flat[start:stop].abs().max().item():.8g})"
    )
    name = str(dtype).removeprefix("torch.")
    peak = peaks[b].item()
    why = (
        f"its largest dequantized value {peak:.8g} is inf in {name}"
        if math.isfinite(peak)
        else "a stored scale or dequantized value overflows"
    )
    limit = largest_magnitude(spec, dtype, block)
    if double_quant:
        raise UnrepresentableError(
            f"{spec.name} with double_quant cannot hold {where}: the double-quantized block scales overflow "
            f"float32; quantize without double_quant ({spec.name} holds magnitudes up to {limit:.8g} in {name})"
        )
    raise UnrepresentableError(
        f"{spec.name} cannot hold {where}: {why}; {spec.name} holds magnitudes up to {limit:.8g} in {name}"
    )


def _index(flat_index: int, shape: torch.Size) -> str:
    idx = []
    for size in reversed(shape):
        flat_index, i = divmod(flat_index, size)
        idx.append(i)
    return ", ".join(str(i) for i in reversed(idx)) or "()"


@cache
def largest_magnitude(spec: FormatSpec, dtype: torch.dtype, block: int | None = None) -> float:
    """The largest magnitude of ``dtype`` that ``spec`` holds: every probe block (a lone
    +-M, a +M/-M pair, seeded random blocks whose max |x| is M) quantizes without overflow.

    Exact for formats whose scale follows the block's absmax, signed max or range (the
    worst block is one of the probes); an estimate for K-quants, whose scales come from a
    search. Bisects over the dtype's bit patterns (positive floats order like their bits),
    so it costs ~31 small quantizations: call it on the error path only.
    """
    block = spec.default_block_size if block is None else block
    units = probe_units(block)  # (k, block) float64, max |x| 1 per row

    def holds_at(bits: int) -> bool:
        m = float(torch.tensor(bits, dtype=_BITS_AS_INT[dtype]).view(dtype))
        probes = (units * m).to(dtype).reshape(-1).to(torch.float32)
        return holds(spec, encode_parts(spec, probes, block), probes.numel(), block, dtype)

    top = int(torch.tensor(torch.finfo(dtype).max, dtype=dtype).view(_BITS_AS_INT[dtype]))
    if holds_at(top):
        return torch.finfo(dtype).max
    lo, hi = 0, top  # invariant: lo holds (0 does: every scale is 0), hi does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if holds_at(mid) else (lo, mid)
    return float(torch.tensor(lo, dtype=_BITS_AS_INT[dtype]).view(dtype))


def probe_units(block: int) -> torch.Tensor:
    """(k, block) float64 rows with max |x| = 1: the extremes that set a block's scale (a
    lone +-1, a +1/-1 pair, all ones for a mean), and seeded random rows (normal, all
    positive, all negative) for searched scales."""
    rows = [torch.zeros(block, dtype=torch.float64) for _ in range(2)] + [torch.ones(block, dtype=torch.float64)]
    rows[0][0], rows[1][0] = 1.0, -1.0
    if block >= 2:
        rows.append(torch.zeros(block, dtype=torch.float64))
        rows[-1][:2] = torch.tensor([1.0, -1.0])
        g = torch.Generator().manual_seed(0)
        normal = torch.randn(block, generator=g, dtype=torch.float64)
        uniform = torch.rand(block, generator=g, dtype=torch.float64)
        rows += [normal / normal.abs().max(), uniform / uniform.max(), -uniform / uniform.max()]
    return torch.stack(rows)
