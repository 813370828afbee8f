"""Learned per-tensor codebooks: qq2..qq8 (quantile) and lloyd2..lloyd8 (Lloyd-Max).

docs/formats.md#learned-codebooks. Each block is scaled by its absmax, as NF4 is, so its
values lie in [-1, 1]; the tensor gets one codebook of 2^k float32 levels learned from all
of its block-normalised values (part ``tensor_codebook``, stored with the tensor and counted
in its bits per weight): qq levels sit at the midpoints of consecutive empirical quantiles,
each holding an equal share of the weights (Dettmers et al. 2022, arXiv 2110.02861 §2);
lloyd levels are those refined by Lloyd-Max iterations to minimise the squared error
(Lloyd 1982). An element takes the nearest level, ties to the lower (bitsandbytes' rule).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..scaling.blocks import split_blocks
from .codebooks import encode_levels
from .registry import GridCodec
from .rounding import midpoints
from .spec import CODES, PACKED, SCALE, TENSOR_SCALE, Anatomy, Field

if TYPE_CHECKING:
    import torch


def normalized(flat: torch.Tensor, block: int) -> torch.Tensor:
    """Every element divided by its block's absmax (the trailing partial block by its own);
    all-zero blocks give zeros."""
    import torch

    pieces = []
    for blocks in split_blocks(flat, block):
        if blocks is not None and blocks.numel():
            absmax = blocks.abs().amax(dim=1, keepdim=True)
            pieces.append((blocks / torch.where(absmax > 0, absmax, torch.ones_like(absmax))).reshape(-1))
    return torch.cat(pieces) if pieces else flat.new_zeros(0)


class LearnedCodebook(GridCodec, family="learned"):
    ANATOMY = Anatomy(
        "an fp32 absmax per block and one codebook of 2^{bits} fp32 levels per tensor", "w = codebook[q] * absmax",
        (Field("codes", CODES, "index q of the codebook level nearest w / absmax (ties to the lower), " + PACKED,
               per="element"),
         Field("tensor_codebook", TENSOR_SCALE, "2^{bits} fp32 levels learned from the tensor's block-normalised "
               "weights", per="tensor", entries="{levels}"),
         Field("scales", SCALE, "fp32 absmax = max|w|")))

    @classmethod
    def tensor_parts(cls, spec, flat, block):
        import torch

        # here, not at the top: codebook_fit imports numpy and torch, which `lowbit formats` does not need
        from ..scaling.codebook_fit import lloyd_levels, quantile_levels

        values = normalized(flat, block)
        # lloyd_levels starts from the same quantile codebook (codebook_fit: one sort for both)
        fit = lloyd_levels if spec.param("fit") == "lloyd" else quantile_levels
        return {"tensor_codebook": fit(values, spec.bits).to(torch.float32).contiguous()}

    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None):
        absmax = blocks.abs().amax(dim=1)
        return {"scales": absmax if ratio is None else absmax * ratio.to(absmax.dtype)}

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial=False):
        return encode_levels(blocks, scales["scales"], midpoints(scales["tensor_codebook"]), None, partial=partial)

    @classmethod
    def decode(cls, spec, codes, scales):
        import torch

        return scales["tensor_codebook"][codes.to(torch.int64)] * scales["scales"][:, None]

    @classmethod
    def table_form(cls, spec, parts):
        return parts["tensor_codebook"], parts["scales"], None

    @classmethod
    def levels(cls, spec, scales):
        book = scales["tensor_codebook"]
        return book, float(book.detach().min()), float(book.detach().max())  # bounds, not part of the graph

    @classmethod
    def search_levels(cls, spec, tensor_parts):
        return tensor_parts["tensor_codebook"]

    @classmethod
    def peak(cls, spec, parts):
        """Largest decoded |value| per block: a bound, the scale times the largest |level|."""
        return parts["scales"].abs() * parts["tensor_codebook"].abs().amax()
