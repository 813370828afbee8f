"""Double quantization of per-block fp32 scales, bitsandbytes layout (docs/formats.md#double-quantization).

``offset = scales.mean()``; ``scales - offset`` is quantized to 8 bits with the
dynamic map in blocks of 256, one fp32 absmax per 256. QLoRA, arXiv 2305.14314 §3.
The 8-bit codes follow bitsandbytes 0.50's native CPU quantizer (cquantize_blockwise_cpu_fp32),
which rounds through a 65536-point grid rather than to the nearest code; see _grid_index.
"""

from __future__ import annotations

from functools import cache

import torch

from .blocks import split_blocks
from .dq_layout import DQ_BLOCK


@cache
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit "dynamic" map (create_dynamic_map(signed=True, 7, 8)).

    Dettmers, "8-Bit Approximations for Parallelism in Deep Learning" (arXiv 1511.04561):
    exponent i takes 2**i evenly spaced fractions in (0.1, 1], scaled by 10**(i - 6),
    both signs; plus 0 and 1. 2 * (2**7 - 1) + 2 = 256 values, sorted.
    """
    values = [0.0, 1.0]
    for i in range(7):
        edges = torch.linspace(0.1, 1, 2**i + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0
        values += (10 ** (i - 6) * mids).tolist()
        values += (-(10 ** (i - 6)) * mids).tolist()
    return torch.tensor(sorted(values), dtype=torch.float32)


@cache
def _dynamic_midpoints() -> torch.Tensor:
    code = dynamic_map()
    return (code[:-1] + code[1:]) / 2


# bitsandbytes 0.50 CPU kernel (csrc/cpu_ops.cpp, kLUTSize): [-1, 1] is cut into 65536
# evenly spaced grid points, each pre-assigned a code; a scaled value takes the code of its
# grid point, not of itself, so a value near a midpoint can land one code off the nearest.
LUT_SIZE = 65536


@cache
def _code_of_grid_point() -> torch.Tensor:
    """(LUT_SIZE,) uint8: the code bitsandbytes assigns to grid point i = 2i/65535 - 1.

    Point i takes the count of midpoints strictly below it (float32 midpoints and grid, as
    the kernel builds them), i.e. the nearest code with a tie going to the lower one.
    """
    i = torch.arange(LUT_SIZE, dtype=torch.float32)
    # (2i) / 65535 in float32: one correctly rounded division per point (tensor / tensor).
    grid = (2 * i) / torch.full_like(i, LUT_SIZE - 1) - 1
    return torch.searchsorted(_dynamic_midpoints(), grid, side="left").to(torch.uint8)


def _grid_index(scaled: torch.Tensor) -> torch.Tensor:
    """float32 scaled values -> int64 grid point in [0, LUT_SIZE).

    The kernel computes trunc(fma((clamp(v) + 1) * 0.5, 65535, 0.5)) in float32 (its compiled
    x86 code fuses the multiply-add). s = clamp(v) + 1 is a float32 multiple of 2**-24 in
    [0, 2], so s * 32767.5 + 0.5 is exact in float64; one rounding to float32 then equals fma's.
    """
    s = scaled.clamp(-1, 1) + 1
    fused = (s.double() * ((LUT_SIZE - 1) / 2) + 0.5).float()
    # NaN converts to INT_MIN on x86, whose low 16 bits pick grid point 0; .long() truncates
    # toward zero like the kernel's cast (fused >= 0.5 otherwise).
    return fused.nan_to_num(0.0).long()


def _quantize_dynamic(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, k) float32 -> ((n * k,) uint8 codes, (n,) float32 absmax), bitsandbytes' CPU rule."""
    absmax = blocks.abs().amax(dim=1)
    # One float32 reciprocal per block, then a product per element, as the kernel does (also
    # for the trailing partial block, where bnb's pure-torch backend divides instead).
    inv = 1.0 / absmax  # (n,)
    # An all-zero block gives 0 * inf = NaN, hence grid point 0 and code 0 (the map's -1):
    # what the kernel writes for such a block, times absmax 0.
    scaled = blocks * inv[:, None]  # (n, k)
    q = _code_of_grid_point()[_grid_index(scaled)]
    return q.reshape(-1), absmax


def compress(scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """(n_blocks,) fp32 scales -> stored parts: uint8 codes, fp32 per-256 absmax, fp32 offset."""
    offset = scales.mean() if scales.numel() else torch.zeros((), dtype=torch.float32)
    head, tail = split_blocks(scales - offset, DQ_BLOCK)
    q, amax = _quantize_dynamic(head)
    if tail is not None:
        tq, tamax = _quantize_dynamic(tail)
        q, amax = torch.cat([q, tq]), torch.cat([amax, tamax])
    return {"scales_q": q, "scales_absmax": amax, "scales_offset": offset.reshape(1)}


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    q = parts["scales_q"]
    n = q.numel()
    vals = dynamic_map()[q.to(torch.int64)]
    amax = parts["scales_absmax"].repeat_interleave(DQ_BLOCK)[:n]
    return vals * amax + parts["scales_offset"]
