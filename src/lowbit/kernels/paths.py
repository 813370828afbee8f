"""The C kernels' fast paths, registered with ``lowbit.dispatch`` per (operation, family).

Each returns None where its kernel does not apply (the reference path then runs) and
otherwise exactly what the reference path returns (tests/kernels/test_paths.py).
Imported by ``lowbit.kernels`` only when the C library loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..dispatch import register
from ..formats.codebooks import codebook_table
from ..gguf.legacy import QK, _fp16_read
from ..scaling.packing import pack_codes, unpack_codes
from .library import empty, native

if TYPE_CHECKING:
    from ..formats.exmy import ExMy


@register("quantize", "int")
def int_quantize(spec, flat, block):
    n, qp = flat.numel(), 2 ** (spec.bits - 1) - 1
    flat = flat.contiguous()
    codes = empty(n, torch.uint8)
    scales = torch.empty((n + block - 1) // block, dtype=torch.float32)
    native.lowbit_int_sym_quantize(flat.data_ptr(), n, block, qp, codes.data_ptr(), scales.data_ptr())
    return {"codes": pack_codes(codes, spec.bits, pad_code=qp), "scales": scales}  # qp: the code of 0


@register("dequantize", "int")
def int_dequantize(spec, parts, n, block):
    codes = unpack_codes(parts["codes"], spec.bits, n).contiguous()
    scales = parts["scales"].contiguous()
    out = empty(n, torch.float32)
    native.lowbit_int_sym_dequantize(codes.data_ptr(), scales.data_ptr(), n, block, 2 ** (spec.bits - 1) - 1,
                                     out.data_ptr())
    return out


@register("quantize", "codebook")
def codebook_quantize(spec, flat, block):
    if spec.bits != 4 or block % 2:  # the C kernel packs whole bytes per block
        return None
    _, mids, order = codebook_table(spec)
    n = flat.numel()
    flat = flat.contiguous()
    packed = empty((n + 1) // 2, torch.uint8)
    absmax = torch.empty((n + block - 1) // block, dtype=torch.float32)
    pad = spec.values.index(0.0)
    order_ptr = None if order is None else order.data_ptr()
    native.lowbit_codebook4_quantize(flat.data_ptr(), n, block, mids.data_ptr(), order_ptr, pad, packed.data_ptr(),
                                     absmax.data_ptr())
    return {"codes": packed, "scales": absmax}


@register("dequantize", "codebook")
def codebook_dequantize(spec, parts, n, block):
    if spec.bits != 4 or block % 2:
        return None
    values, _, _ = codebook_table(spec)
    out = empty(n, torch.float32)
    codes, scales = parts["codes"].contiguous(), parts["scales"].contiguous()
    native.lowbit_codebook4_dequantize(codes.data_ptr(), scales.data_ptr(), values.data_ptr(), n, block,
                                       out.data_ptr())
    return out


@register("quantize", "gguf_legacy")
def gguf_quantize(spec, flat, block):
    if spec.name not in ("q8_0", "q4_0"):
        return None
    nb = flat.numel() // QK
    flat = flat.contiguous()
    data = empty(nb * spec.block_bytes, torch.uint8).view(nb, -1)
    d = torch.empty(nb, dtype=torch.float32)
    getattr(native, f"lowbit_{spec.name}_quantize")(flat.data_ptr(), nb, d.data_ptr(), data.data_ptr())
    # fp32 -> fp16 (round to nearest even, as legacy._fp16_bytes) straight into each block's
    # first two bytes: one strided pass instead of a conversion and a 2-byte strided copy
    data.view(torch.float16)[:, 0] = d
    return {"data": data}


@register("dequantize", "gguf_legacy")
def gguf_dequantize(spec, parts, n, block):
    if spec.name not in ("q8_0", "q4_0"):
        return None
    data = parts["data"].contiguous()
    nb = data.shape[0]
    d = _fp16_read(data[:, :2]).view(-1).contiguous()
    out = empty(n, torch.float32)
    getattr(native, f"lowbit_{spec.name}_dequantize")(data.data_ptr(), d.data_ptr(), nb, out.data_ptr())
    return out


@register("round", "exmy")
def exmy_round(fmt: ExMy, x: torch.Tensor) -> torch.Tensor:
    """ExMy.encode's rule (nearest, ties to even, saturating, +0 for zero) in one C pass."""
    mids, codes, tie_up = fmt.round_table
    flat = x.contiguous().view(-1)
    out = empty(flat.numel(), torch.uint8)
    native.lowbit_table_round(flat.data_ptr(), flat.numel(), mids.data_ptr(), mids.numel(), codes.data_ptr(),
                              tie_up.data_ptr(), fmt.exp_bits + fmt.man_bits, out.data_ptr())
    return out.view(x.shape)


@register("lut_scale", "minifloat", "mx", "nvfp4")
def lut_scale(codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """table[codes] * scales[:, None] for (n_blocks, block) uint8 codes."""
    n_blocks, block = codes.shape
    codes = codes.contiguous()
    full = torch.zeros(256, dtype=torch.float32)
    full[: table.numel()] = table
    scales = scales.to(torch.float32).contiguous()
    out = empty(codes.numel(), torch.float32)
    native.lowbit_lut_scale(codes.data_ptr(), codes.numel(), block, full.data_ptr(), scales.data_ptr(), out.data_ptr())
    return out.view(n_blocks, block)


@register("search", "int", "codebook", "minifloat", "ternary", "learned")
def search_table(blocks, weights, base, ratios, levels, centre=None):
    """Per block, the index into ``ratios`` (or centre + ratios) of the least (weighted) squared
    error of rounding ``blocks / (base * ratio)`` to the sorted ``levels`` (lowbit_search_table)."""
    n_blocks, block = blocks.shape
    blocks, base = blocks.contiguous(), base.to(torch.float32).contiguous()
    levels = levels.to(torch.float32).contiguous()
    mids = ((levels[:-1] + levels[1:]) / 2).contiguous()
    ratios = ratios.to(torch.float32).contiguous()
    w = None if weights is None else weights.contiguous()
    c = None if centre is None else centre.to(torch.float32).contiguous()
    idx = torch.empty(n_blocks, dtype=torch.int32)
    err = torch.empty(n_blocks, dtype=torch.float32)
    native.lowbit_search_table(blocks.data_ptr(), None if w is None else w.data_ptr(), n_blocks, block,
                               base.data_ptr(), None if c is None else c.data_ptr(), ratios.data_ptr(),
                               ratios.numel(), levels.data_ptr(), mids.data_ptr(), mids.numel(), idx.data_ptr(),
                               err.data_ptr())
    return idx.to(torch.int64)
