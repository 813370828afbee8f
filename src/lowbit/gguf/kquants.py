"""GGUF K-quants Q4_K and Q6_K (docs/formats.md#gguf-k-quants): super-blocks of 256 weights.

The quantizers follow llama.cpp's reference ones (ggml-quants.c quantize_row_q4_K_ref,
quantize_row_q6_K_ref with make_qkx2_quants / make_qx_quants), vectorized over all
sub-blocks at once. gguf-py only dequantizes these types, so there are no reference
bytes to match; tests check that gguf.quants.dequantize reads our bytes exactly as we
do and that the error stays within llama.cpp's test-quantize-fns limits. Sums run in
a different order than the C loops, so an occasional code may differ from llama.cpp's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..formats.registry import Codec
from ..formats.spec import CODES, GGUF_NO_DQ, SCALE, Anatomy, Field
from .legacy import KIND, _fp16_bytes, _fp16_read

if TYPE_CHECKING:
    import torch

QK_K = 256  # ggml-common.h: weights per super-block


def _search_scale_min(x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int):
    """make_qkx2_quants (use_mad=False), for every row of x at once.

    x, w: (g, n). Fits x ~ scale * L - the_min with L in [0, nmax], trying nstep+1 scales
    around nmax / (max - min) and keeping the one of least weighted squared error.
    Returns scale (g,), the_min (g,), L (g, n) uint8.
    """
    import torch

    lo = x.amin(dim=1).clamp(max=0)  # llama.cpp: if (min > 0) min = 0
    hi = x.amax(dim=1)
    span = hi - lo
    flat = span == 0
    span = torch.where(flat, torch.ones_like(span), span)
    sum_w = w.sum(dim=1)
    sum_x = (w * x).sum(dim=1)

    iscale = nmax / span
    scale = 1 / iscale
    L = torch.round(iscale[:, None] * (x - lo[:, None])).clamp_(0, nmax)
    best = (w * (scale[:, None] * L + lo[:, None] - x) ** 2).sum(dim=1)
    best_min = lo.clone()
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * step + nmax) / span
        la = torch.round(iscale[:, None] * (x - lo[:, None])).clamp_(0, nmax)
        sum_l = (w * la).sum(dim=1)
        sum_l2 = (w * la * la).sum(dim=1)
        sum_xl = (w * la * x).sum(dim=1)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        D = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
        positive = this_min > 0  # the fit wants a positive offset: pin it to 0, refit the scale
        this_scale = torch.where(positive, sum_xl / sum_l2.clamp(min=torch.finfo(torch.float32).tiny), this_scale)
        this_min = torch.where(positive, torch.zeros_like(this_min), this_min)
        err = (w * (this_scale[:, None] * la + this_min[:, None] - x) ** 2).sum(dim=1)
        better = ok & (err < best)
        L = torch.where(better[:, None], la, L)
        best = torch.where(better, err, best)
        scale = torch.where(better, this_scale, scale)
        best_min = torch.where(better, this_min, best_min)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    L = torch.where(flat[:, None], torch.zeros_like(L), L)
    return scale, -best_min, L


def _search_symmetric(x: torch.Tensor, nmax: int):
    """make_qx_quants(rmse_type=1, no importance): x ~ scale * l, l in [-nmax, nmax-1],
    weights x^2, trying iscale = -(nmax + 0.1 k) / max for k = -9..9. Returns scale (g,)."""
    import torch

    amax, idx = x.abs().max(dim=1)
    signed_max = x.gather(1, idx[:, None]).squeeze(1)
    zero = amax < 1e-30  # llama.cpp: all-zero group
    signed_max = torch.where(zero, torch.ones_like(signed_max), signed_max)
    w = x * x

    def fit(iscale):
        l = torch.round(iscale[:, None] * x).clamp_(-nmax, nmax - 1)
        return (w * x * l).sum(dim=1), (w * l * l).sum(dim=1)

    sumlx, suml2 = fit(-nmax / signed_max)
    # llama.cpp: suml2 ? sumlx/suml2 : 0. x^2 underflows to 0 for |x| below ~1e-23: no NaN from 0/0
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), 0.0)
    best = scale * sumlx
    for k in [k for k in range(-9, 10) if k]:
        slx, sl2 = fit(-(nmax + 0.1 * k) / signed_max)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = torch.where(better, slx / sl2.clamp(min=torch.finfo(torch.float32).tiny), scale)
        best = torch.where(better, scale * slx, best)
    return torch.where(zero, torch.zeros_like(scale), scale)


class Q4K(Codec, family="gguf_q4_k"):
    """block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit scales and mins for 8 sub-blocks
    of 32, 128 bytes of nibbles (64 weights per 32 bytes: low nibbles first 32, high next)."""

    KIND = KIND

    ANATOMY = Anatomy(
        "fp16 super-scales d and dmin and 6-bit scales and mins for 8 sub-blocks of 32, inside each "
        "{bytes}-byte block", "w = q * (d * sc) - dmin * m, sc and m those of the element's sub-block",
        (Field("d", SCALE, "fp16 d, the step of the 6-bit sub-block scales", nbytes=2, fill="fp16 1"),
         Field("dmin", SCALE, "fp16 dmin, the step of the 6-bit sub-block mins", nbytes=2, fill="fp16 0"),
         Field("scales", SCALE, "8 scales sc and 8 mins m, 6 bits each (llama.cpp get_scale_min_k4 packing)",
               nbytes=12, fill="unit"),
         Field("qs", CODES, "256 4-bit codes, 32 bytes per 64 weights: the first 32 in the low nibbles, the next "
               "32 in the high", nbytes=128, fill="nibbles")),
        fixed_by="GGUF", no_double_quant=GGUF_NO_DQ)

    @classmethod
    def quantize_blocks(cls, spec, blocks, *, partial, tensor_parts):
        import torch

        nb = blocks.shape[0]
        x = blocks.view(nb * 8, 32)
        av_x = (x * x).sum(dim=1, keepdim=True).div(32).sqrt()
        # make_qkx2_quants(32, 15, ..., rmin=-1, rdelta=0.1, nstep=20): quantize_row_q4_K_ref's settings
        scales, mins, searched = _search_scale_min(x, av_x + x.abs(), 15, -1.0, 0.1, 20)
        scales, mins = scales.view(nb, 8), mins.view(nb, 8)
        max_scale, max_min = scales.amax(dim=1), mins.amax(dim=1)
        inv_scale = torch.where(max_scale > 0, 63 / max_scale, torch.zeros_like(max_scale))
        inv_min = torch.where(max_min > 0, 63 / max_min, torch.zeros_like(max_min))
        ls = torch.round(inv_scale[:, None] * scales).clamp_(max=63).to(torch.uint8)
        lm = torch.round(inv_min[:, None] * mins).clamp_(max=63).to(torch.uint8)
        d16, dmin16 = _fp16_bytes(max_scale / 63), _fp16_bytes(max_min / 63)
        d = _fp16_read(d16) * ls.float()  # (nb, 8)
        dm = _fp16_read(dmin16) * lm.float()
        xs = blocks.view(nb, 8, 32)
        L = torch.round((xs + dm[:, :, None]) / d.clamp(min=torch.finfo(torch.float32).tiny)[:, :, None])
        L = L.clamp_(0, 15).to(torch.uint8)
        # a sub-block whose scale code is 0 keeps the search's codes (llama.cpp: `if (!d) continue`)
        L = torch.where((d == 0)[:, :, None], searched.view(nb, 8, 32).to(torch.uint8), L)
        q = L.view(nb, 4, 2, 32)
        qs = (q[:, :, 0] | (q[:, :, 1] << 4)).view(nb, 128)
        return {"data": torch.cat([d16, dmin16, _pack_scales_k4(ls, lm), qs], dim=1)}

    @classmethod
    def dequantize_blocks(cls, spec, parts, n_blocks, block):
        import torch

        data = parts["data"]
        d, dmin = _fp16_read(data[:, 0:2]), _fp16_read(data[:, 2:4])
        sc, m = _unpack_scales_k4(data[:, 4:16])
        qs = data[:, 16:].view(n_blocks, 4, 1, 32)
        q = torch.cat([qs & 0x0F, qs >> 4], dim=2).view(n_blocks, 8, 32).float()
        return ((d * sc.float())[:, :, None] * q - (dmin * m.float())[:, :, None]).view(n_blocks, QK_K)


def _pack_scales_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """8 six-bit scales and mins -> 12 bytes (ggml-quants.c get_scale_min_k4, inverted)."""
    import torch

    out = torch.zeros(ls.shape[0], 12, dtype=torch.uint8)
    out[:, 0:4] = ls[:, :4] | ((ls[:, 4:] >> 4) << 6)
    out[:, 4:8] = lm[:, :4] | ((lm[:, 4:] >> 4) << 6)
    out[:, 8:12] = (ls[:, 4:] & 0x0F) | ((lm[:, 4:] & 0x0F) << 4)
    return out


def _unpack_scales_k4(s: torch.Tensor):
    import torch

    sc = torch.cat([s[:, 0:4] & 63, (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)], dim=1)
    m = torch.cat([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], dim=1)
    return sc, m


class Q6K(Codec, family="gguf_q6_k"):
    """block_q6_K: 128 bytes low nibbles, 64 bytes high 2-bit pairs, 16 int8 sub-block
    scales (16 weights each), fp16 d. Codes l + 32, l in [-32, 31]."""

    KIND = KIND

    ANATOMY = Anatomy(
        "16 int8 sub-block scales and an fp16 super-scale d inside each {bytes}-byte block",
        "w = (q - 32) * d * sc, sc that of the element's sub-block of 16",
        (Field("ql", CODES, "low 4 bits of the 256 6-bit codes, two per byte", nbytes=128, fill="nibbles"),
         Field("qh", CODES, "high 2 bits of the codes, four per byte", nbytes=64, fill="bits45"),
         Field("scales", SCALE, "16 int8 sub-block scales sc, one per 16 weights", nbytes=16, fill="unit"),
         Field("d", SCALE, "fp16 d, the step of the sub-block scales", nbytes=2, fill="fp16 1")),
        fixed_by="GGUF", no_double_quant=GGUF_NO_DQ)

    @classmethod
    def quantize_blocks(cls, spec, blocks, *, partial, tensor_parts):
        import torch

        nb = blocks.shape[0]
        x = blocks.view(nb * 16, 16)
        scales = _search_symmetric(x, 32).view(nb, 16)
        idx = scales.abs().argmax(dim=1, keepdim=True)
        max_scale = scales.gather(1, idx).squeeze(1)
        zero = max_scale == 0
        iscale = -128 / torch.where(zero, torch.ones_like(max_scale), max_scale)
        d16 = _fp16_bytes(torch.where(zero, torch.zeros_like(iscale), 1 / iscale))
        sc = torch.round(iscale[:, None] * scales).clamp_(max=127)
        sc = torch.where(zero[:, None], torch.zeros_like(sc), sc)
        d = _fp16_read(d16) * sc  # (nb, 16)
        xs = blocks.view(nb, 16, 16)
        safe = torch.where(d == 0, torch.ones_like(d), d)
        L = (torch.round(xs / safe[:, :, None]).clamp_(-32, 31) + 32).to(torch.uint8)
        if (d == 0).any():  # llama.cpp keeps make_qx_quants' codes there; they decode to 0 anyway
            L = torch.where((d == 0)[:, :, None], torch.full_like(L, 32), L)
        L = L.view(nb, 2, 4, 32)  # halves of 128; quarters of 32
        ql = torch.cat([L[:, :, 0] & 0x0F | ((L[:, :, 2] & 0x0F) << 4), L[:, :, 1] & 0x0F | ((L[:, :, 3] & 0x0F) << 4)],
                       dim=2).view(nb, 128)
        h = L >> 4
        qh = (h[:, :, 0] | (h[:, :, 1] << 2) | (h[:, :, 2] << 4) | (h[:, :, 3] << 6)).view(nb, 64)
        return {"data": torch.cat([ql, qh, sc.to(torch.int8).view(torch.uint8), d16], dim=1)}

    @classmethod
    def dequantize_blocks(cls, spec, parts, n_blocks, block):
        import torch

        data = parts["data"]
        ql = data[:, :128].view(n_blocks, 2, 2, 32)
        qh = data[:, 128:192].view(n_blocks, 2, 1, 32)
        sc = data[:, 192:208].contiguous().view(torch.int8).float()
        d = _fp16_read(data[:, 208:210])
        low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # quarters 0, 1, 2, 3 of each half
        high = torch.cat([(qh >> s) & 3 for s in (0, 2, 4, 6)], dim=2)
        q = (low | (high << 4)).view(n_blocks, 16, 16).float() - 32
        return ((d * sc)[:, :, None] * q).view(n_blocks, QK_K)


# the formats q4_k and q6_k: lowbit.formats.catalog
