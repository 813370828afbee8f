"""Ternary weights, BitNet b1.58 (Ma et al., arXiv 2402.17764, eq. 1-3).

gamma = mean |W| over the block; q = clamp(round(W / gamma), -1, 1); W^ = q * gamma.
BitNet takes gamma per tensor; here per block (block_size >= numel gives BitNet's choice).
Codes are stored two bits each (q + 1), so 2 bits per weight plus the scale.
"""

from __future__ import annotations

from .registry import GridCodec
from .spec import CODES, PACKED, SCALE, Anatomy, Field

_TINY = 2.0**-126  # all-zero block: gamma 0, codes 0, no NaN (torch.finfo(torch.float32).tiny)


class Ternary(GridCodec, family="ternary"):
    ANATOMY = Anatomy(
        "an fp32 absmean gamma = mean|w| per block", "w = level[q] * gamma",
        (Field("codes", CODES, "q + 1, q = round(w / gamma) clamped to -1..1, " + PACKED, per="element"),
         Field("scales", SCALE, "fp32 gamma = mean|w|")))

    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None):
        gamma = blocks.abs().mean(dim=1)  # (n_blocks,)
        return {"scales": gamma if ratio is None else gamma * ratio.to(gamma.dtype)}

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial=False):
        import torch

        q = torch.round(blocks / scales["scales"].clamp(min=_TINY)[:, None]).clamp_(-1, 1)
        return (q + 1).to(torch.uint8)

    @classmethod
    def decode(cls, spec, codes, scales):
        import torch

        return (codes.to(torch.float32) - 1) * scales["scales"][:, None]

    @classmethod
    def table_form(cls, spec, parts):
        import torch

        return torch.arange(2**spec.bits, dtype=torch.float32) - 1, parts["scales"], None

    @classmethod
    def peak(cls, spec, parts):
        """Largest decoded |value| per block (code +-1; gamma is a float32 mean, which can overflow)."""
        return parts["scales"].abs()
