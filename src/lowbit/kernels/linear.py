"""The fused linear kernel (linear.c): ``y = x W^T + b`` read straight from the stored parts.

Registered with ``lowbit.dispatch`` as ``("linear", family)``: ``QuantLinear.forward`` asks
for it and falls back to dequantize-then-matmul where it returns None (another device or
dtype, a cached dense weight, codes of other than 4 or 8 bits, a GGUF type without a
kernel). The decoded weights equal the reference decode to the bit; only the summation
order of the products differs, so the result matches ``F.linear`` on the reference weight
to float32 rounding (tests/kernels/test_linear.py states the tolerance).

Small batches (decoding, up to ``ROWS_FUSED`` input rows) run fully fused. Larger ones
(prefill) decode a tile of weight rows at a time into a scratch buffer and multiply it
with torch's matmul, so the full-precision weight never exists at once: up to
``TILE_BYTES`` of it does.
"""

from __future__ import annotations

import ctypes
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..dispatch import register
from ..formats.registry import GridCodec, codec_for
from ..scaling import double_quant
from .library import native

if TYPE_CHECKING:
    from ..tensor import QuantizedTensor

# kinds of stored weight, as in linear.h (F32: a dense float32 weight, for the decode step)
LUT4, AFFINE4, LUT8, AFFINE8, Q4_0, Q8_0, F32 = range(7)
GGUF_KINDS = {"q4_0": Q4_0, "q8_0": Q8_0}
# Crossover measured on 2 cores, 1536x576 q4_0 and nf4: fused 390/462 us vs tiled 750/805 us at 8 rows,
# 675/664 vs 628/590 at 16
ROWS_FUSED = 8
TILE_BYTES = 1 << 20  # a tile of decoded rows stays in L2 while torch's matmul reads it
ISA = native.lowbit_linear_isa()  # 1: AVX2 + FMA + F16C path, 0: portable C (same numbers)


class _Weights(ctypes.Structure):
    _fields_ = [
        ("kind", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("out_features", ctypes.c_int64),
        ("block", ctypes.c_int64),
        ("codes", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("factor", ctypes.c_void_p),
        ("zero", ctypes.c_void_p),
        ("affine_offset", ctypes.c_float),
    ]


native.lowbit_linear.argtypes = [ctypes.POINTER(_Weights), ctypes.c_void_p, ctypes.c_int64, ctypes.c_void_p,
                                 ctypes.c_void_p, ctypes.c_int]
native.lowbit_linear.restype = ctypes.c_int
native.lowbit_decode_rows.argtypes = [ctypes.POINTER(_Weights), ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
                                      ctypes.c_int]


@dataclass(eq=False)
class Prepared:
    """What the kernel reads for one weight: the struct, and the tensors its pointers name."""

    weights: _Weights
    keep: tuple[torch.Tensor, ...]

    def __post_init__(self):
        self.ref = ctypes.pointer(self.weights)


_prepared: weakref.WeakKeyDictionary[QuantizedTensor, Prepared | bool] = weakref.WeakKeyDictionary()


def prepare(q: QuantizedTensor) -> Prepared | None:
    """The kernel's view of ``q`` (decompressed double-quant scales, the level table), made
    once per QuantizedTensor and kept while it lives; None where no kernel applies."""
    p = _prepared.get(q)
    if p is None:
        p = _prepared[q] = _prepare(q) or False
    return p or None


def _prepare(q: QuantizedTensor) -> Prepared | None:
    if len(q.shape) != 2 or any(t.device.type != "cpu" for t in q.parts.values()):
        return None
    n, k = (int(d) for d in q.shape)
    spec = q.format
    if spec.name in GGUF_KINDS:
        if k % 32:  # GGUF rows hold whole 32-weight blocks (ggml-common.h QK4_0, QK8_0)
            return None
        data = q.parts["data"].contiguous()
        return _made(GGUF_KINDS[spec.name], n, k, q.block_size, data, None, None, None, 0.0)
    codec = codec_for(spec)
    if not issubclass(codec, GridCodec) or spec.bits not in (4, 8):
        return None
    parts = dict(q.parts)
    if q.double_quant:
        parts["scales"] = double_quant.decompress(parts)
    form = codec.table_form(spec, parts)
    if form is None:
        return None
    table, factor, zero = (None if t is None else t.to(torch.float32).contiguous() for t in form)
    full = torch.zeros(2**spec.bits, dtype=torch.float32)
    full[: table.numel()] = table
    kind, offset = _kind(full)
    return _made(kind, n, k, q.block_size, parts["codes"].contiguous(), full, factor.reshape(-1), zero, offset)


def _kind(table: torch.Tensor) -> tuple[int, float]:
    """AFFINE4/8 when ``table[q] == q - c`` for every code (integer levels: computed, the
    same floats, instead of looked up), else LUT4/8."""
    c = float(-table[0])
    steps = torch.arange(table.numel(), dtype=torch.float32) - c
    affine = c == int(c) and torch.equal(steps, table)
    if table.numel() == 16:
        return (AFFINE4, c) if affine else (LUT4, 0.0)
    return (AFFINE8, c) if affine else (LUT8, 0.0)


def _made(kind, n, k, block, codes, table, factor, zero, offset) -> Prepared:
    def ptr(t):
        return None if t is None else t.data_ptr()

    w = _Weights(kind, k, n, block, ptr(codes), ptr(table), ptr(factor), ptr(zero), offset)
    return Prepared(w, tuple(t for t in (codes, table, factor, zero) if t is not None))


@register("linear", "int", "int_asym", "codebook", "learned", "minifloat", "mx", "nvfp4", "ternary", "gguf_legacy")
def linear(q: QuantizedTensor, x: torch.Tensor, bias: torch.Tensor | None, *, isa: int | None = None):
    """``F.linear(x, q.dequantize(), bias)`` without the dense weight; None where it does not apply.

    ``isa``: 1 the AVX2 path, 0 the portable one (the same numbers); default: the best here.
    """
    # Every line here runs once per layer per token: kept to plain attribute checks.
    if x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if torch.is_grad_enabled() and (x.requires_grad or bias is not None and bias.requires_grad):
        return None  # the kernel has no backward: autograd takes the reference path
    if bias is not None and (bias.dtype != torch.float32 or bias.device.type != "cpu"):
        return None
    p = prepare(q)
    if p is None:
        return None
    n, k = p.weights.out_features, p.weights.in_features
    x2 = x if x.dim() == 2 and x.is_contiguous() else x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    if m <= ROWS_FUSED:
        y = torch.empty((m, n), dtype=torch.float32)
        b = None if bias is None else bias.contiguous()  # a name holds it while C reads it
        if native.lowbit_linear(p.ref, x2.data_ptr(), m, None if b is None else b.data_ptr(), y.data_ptr(),
                                ISA if isa is None else isa):
            raise MemoryError(f"lowbit.kernels.linear: no memory for a row buffer of {k} floats")
    else:
        y = _tiled(p, x2, None if bias is None else bias.detach(), ISA if isa is None else isa)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], n)


def _tiled(p: Prepared, x2: torch.Tensor, bias: torch.Tensor | None, isa: int) -> torch.Tensor:
    """Decode ``rows`` weight rows at a time and let torch multiply them: y^T tile by tile."""
    n, k = p.weights.out_features, p.weights.in_features
    rows = max(1, min(n, TILE_BYTES // (4 * k)))
    tile = torch.empty(rows, k, dtype=torch.float32)
    yt = torch.empty(n, x2.shape[0], dtype=torch.float32)  # (N, M)
    xt = x2.t()
    for o0 in range(0, n, rows):
        o1 = min(n, o0 + rows)
        native.lowbit_decode_rows(p.ref, o0, o1, tile.data_ptr(), isa)
        torch.mm(tile[: o1 - o0], xt, out=yt[o0:o1])
    y = yt.t().contiguous()
    return y if bias is None else y.add_(bias)
