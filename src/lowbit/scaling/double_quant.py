"""Double quantization of per-block fp32 scales, bitsandbytes layout (SPEC.md §6).

``offset = scales.mean()``; ``scales - offset`` is quantized to 8 bits with the
dynamic map in blocks of 256, one fp32 absmax per 256. QLoRA, arXiv 2305.14314 §3.
"""

from __future__ import annotations

from functools import cache

import torch

from .blocks import split_blocks

DQ_BLOCK = 256  # bitsandbytes quantize_4bit(compress_statistics=True) second-level block


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


def _quantize_dynamic(blocks: torch.Tensor, partial: bool) -> tuple[torch.Tensor, torch.Tensor]:
    absmax = blocks.abs().amax(dim=1)
    safe = absmax.clamp(min=1e-38)
    # Same arithmetic as bitsandbytes' reference (backends/default quantize_blockwise).
    scaled = blocks / safe[:, None] if partial else blocks * (1.0 / safe[:, None])
    scaled = scaled.clamp(-1, 1)
    q = torch.bucketize(scaled, _dynamic_midpoints(), out_int32=True).to(torch.uint8)
    return q.reshape(-1), absmax


def compress(scales: torch.Tensor) -> dict[str, torch.Tensor]:
    """(n_blocks,) fp32 scales -> stored parts: uint8 codes, fp32 per-256 absmax, fp32 offset."""
    offset = scales.mean() if scales.numel() else torch.zeros((), dtype=torch.float32)
    head, tail = split_blocks(scales - offset, DQ_BLOCK)
    q, amax = _quantize_dynamic(head, False)
    if tail is not None:
        tq, tamax = _quantize_dynamic(tail, True)
        q, amax = torch.cat([q, tq]), torch.cat([amax, tamax])
    return {"scales_q": q, "scales_absmax": amax, "scales_offset": offset.reshape(1)}


def decompress(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    q = parts["scales_q"]
    n = q.numel()
    vals = dynamic_map()[q.to(torch.int64)]
    amax = parts["scales_absmax"].repeat_interleave(DQ_BLOCK)[:n]
    return vals * amax + parts["scales_offset"]
