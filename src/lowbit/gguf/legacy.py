"""GGUF legacy block formats Q8_0, Q4_0, Q4_1, Q5_0, Q5_1 (docs/formats.md#gguf-legacy-blocks).

Block layouts from llama.cpp ggml-common.h (block_q8_0 ...); arithmetic as
ggml-quants.c quantize_row_*_ref and gguf-py gguf/quants.py compute it, float32 step
for float32 step, so ``tobytes()`` equals ``gguf.quants.quantize(...).tobytes()``.
Nibbles: element j in the low nibble, j + 16 in the high nibble; Q5 keeps bit 4 of
each code in a little-endian 32-bit mask ``qh``.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING

from ..formats.registry import Codec
from ..formats.spec import CODES, GGUF_NO_DQ, SCALE, Anatomy, Field

if TYPE_CHECKING:
    import torch

KIND = "a GGUF block format, with its own layout and scale search"  # Codec.KIND of every GGUF family
QK = 32  # weights per block: ggml-common.h QK4_0 = QK4_1 = QK5_0 = QK5_1 = QK8_0 = 32


def _fp16_bytes(v: torch.Tensor) -> torch.Tensor:
    """(n,) float32 -> (n, 2) uint8: IEEE half, round to nearest even (numpy astype(float16))."""
    import torch

    return v.to(torch.float16).view(torch.uint8).view(-1, 2)


def _fp16_read(b: torch.Tensor) -> torch.Tensor:
    """(n, 2) uint8 -> (n, 1) float32."""
    import torch

    return b.contiguous().view(torch.float16).to(torch.float32).view(-1, 1)


def _inverse(d: torch.Tensor) -> torch.Tensor:
    """id = 1/d, and 0 where d == 0 (ggml: `id = d ? 1.0f/d : 0.0f`)."""
    import torch

    return torch.where(d == 0, torch.zeros_like(d), 1 / d)


def _finite_or_zero(v: torch.Tensor) -> torch.Tensor:
    """v with non-finite entries set to 0. They arise only when 1/d overflowed (d subnormal:
    every value of the block then decodes alike) and become code 0, which is what ggml's
    ``(int8_t)`` cast and numpy's ``astype`` to an integer produce on x86 (cvttss2si returns
    0x80000000, low byte 0) and so what gguf-py's bytes hold."""
    import torch

    return torch.where(v.isfinite(), v, 0)


def _codes(v: torch.Tensor, top: int) -> torch.Tensor:
    """trunc(v) clamped to [0, top], as uint8; non-finite v gives 0 (``_finite_or_zero``)."""
    import torch

    return _finite_or_zero(v).trunc_().clamp_(0, top).to(torch.uint8)


def _roundf(v: torch.Tensor) -> torch.Tensor:
    """C roundf: half away from zero. a - trunc(a) is exact, so the 0.5 test is too."""
    import torch

    a = v.abs()
    t = a.trunc()
    return torch.copysign(t + (a - t >= 0.5), v)


def _split_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) codes -> (n, 16) bytes: low nibble j, high nibble j + 16."""
    return (q[:, : QK // 2] & 0x0F) | ((q[:, QK // 2 :] & 0x0F) << 4)


def _join_nibbles(qs: torch.Tensor) -> torch.Tensor:
    import torch

    return torch.cat([qs & 0x0F, qs >> 4], dim=1)


@cache
def _bit_weights() -> torch.Tensor:
    """(8,) uint8 1, 2, ..., 128: little-endian bit order in a byte."""
    import torch

    return 2 ** torch.arange(8, dtype=torch.uint8)


def _high_bits(q: torch.Tensor) -> torch.Tensor:
    """(n, 32) 5-bit codes -> (n, 4) bytes of bit 4, element j at bit j (little-endian uint32)."""
    import torch

    bits = (q >> 4).view(-1, 4, 8)
    return (bits * _bit_weights()).sum(dim=2, dtype=torch.uint8)


def _read_high_bits(qh: torch.Tensor) -> torch.Tensor:
    import torch

    return ((qh[:, :, None] & _bit_weights()) != 0).view(-1, QK).to(torch.uint8) << 4


# q4_0's and q4_1's codes, laid out alike (llama.cpp ggml-common.h, block_q4_0 and block_q4_1)
_NIBBLES = Field("qs", CODES, "32 4-bit codes: element j in the low nibble of byte j, element j+16 in the high nibble",
                 nbytes=16, fill="nibbles")


class GGUFLegacy(Codec, family="gguf_legacy"):
    """params: kind "sym" (d = signed max / -2^(b-1), codes offset by 2^(b-1)), "asym"
    (d = (max - min) / (2^b - 1), m = min), or "q8" (d = amax / 127, roundf)."""

    KIND = KIND

    ANATOMIES = {  # by format name: each lays its block out differently
        "q8_0": Anatomy(
            "an fp16 scale d inside each {bytes}-byte block", "w = q * d, q the code byte read as int8",
            (Field("d", SCALE, "fp16 d = max|w| / 127", nbytes=2, fill="fp16 1"),
             Field("qs", CODES, "32 int8 codes q = roundf(w / d), element j in byte j", nbytes=32, fill="byte")),
            fixed_by="GGUF", no_double_quant=GGUF_NO_DQ),
        "q4_0": Anatomy(
            "an fp16 scale d inside each {bytes}-byte block", "w = (q - 8) * d",
            (Field("d", SCALE, "fp16 d = m / -8, m the value of largest magnitude", nbytes=2, fill="fp16 1"),
             _NIBBLES),
            fixed_by="GGUF", no_double_quant=GGUF_NO_DQ),
        "q4_1": Anatomy(
            "an fp16 scale d and an fp16 minimum m inside each {bytes}-byte block", "w = q * d + m",
            (Field("d", SCALE, "fp16 d = (max - min) / 15", nbytes=2, fill="fp16 1"),
             Field("m", SCALE, "fp16 m = min", nbytes=2, fill="fp16 0"),
             _NIBBLES),
            fixed_by="GGUF", no_double_quant=GGUF_NO_DQ),
        "q5_0": Anatomy(
            "an fp16 scale d inside each {bytes}-byte block", "w = (q - 16) * d",
            (Field("d", SCALE, "fp16 d = m / -16, m the value of largest magnitude", nbytes=2, fill="fp16 1"),
             Field("qh", CODES, "bit 4 of the 32 5-bit codes: element j at bit j of a little-endian uint32",
                   nbytes=4, fill="bit4"),
             Field("qs", CODES, "low 4 bits of the codes: element j in the low nibble of byte j, j+16 in the high",
                   nbytes=16, fill="nibbles")),
            fixed_by="GGUF", no_double_quant=GGUF_NO_DQ),
        "q5_1": Anatomy(
            "an fp16 scale d and an fp16 minimum m inside each {bytes}-byte block", "w = q * d + m",
            (Field("d", SCALE, "fp16 d = (max - min) / 31", nbytes=2, fill="fp16 1"),
             Field("m", SCALE, "fp16 m = min", nbytes=2, fill="fp16 0"),
             Field("qh", CODES, "bit 4 of the 32 5-bit codes: element j at bit j of a little-endian uint32",
                   nbytes=4, fill="bit4"),
             Field("qs", CODES, "low 4 bits of the codes: element j in the low nibble of byte j, j+16 in the high",
                   nbytes=16, fill="nibbles")),
            fixed_by="GGUF", no_double_quant=GGUF_NO_DQ),
    }

    @classmethod
    def anatomy_for(cls, spec):
        return cls.ANATOMIES[spec.name]

    @classmethod
    def quantize_blocks(cls, spec, blocks, *, partial, tensor_parts):
        import torch

        kind, bits = spec.param("kind"), spec.bits
        if kind == "q8":
            d = blocks.abs().amax(dim=1, keepdim=True) / 127
            q = _roundf(_finite_or_zero(blocks * _inverse(d))).to(torch.int8).view(torch.uint8)
            return {"data": torch.cat([_fp16_bytes(d), q], dim=1)}
        if kind == "sym":
            half = 2 ** (bits - 1)
            signed_max = blocks.gather(1, blocks.abs().argmax(dim=1, keepdim=True))  # first wins
            d = signed_max / -half
            q = _codes(blocks * _inverse(d) + (half + 0.5), 2**bits - 1)
            head = [_fp16_bytes(d)]
        else:
            lo, hi = blocks.amin(dim=1, keepdim=True), blocks.amax(dim=1, keepdim=True)
            d = (hi - lo) / (2**bits - 1)
            q = _codes((blocks - lo) * _inverse(d) + 0.5, 2**bits - 1)
            head = [_fp16_bytes(d), _fp16_bytes(lo)]
        if bits == 5:
            head.append(_high_bits(q))
        return {"data": torch.cat([*head, _split_nibbles(q)], dim=1)}

    @classmethod
    def dequantize_blocks(cls, spec, parts, n_blocks, block):
        import torch

        kind, bits = spec.param("kind"), spec.bits
        data = parts["data"]
        d = _fp16_read(data[:, :2])
        if kind == "q8":
            return data[:, 2:].contiguous().view(torch.int8).to(torch.float32) * d
        at = 2 if kind == "sym" else 4
        qh = None
        if bits == 5:
            qh, at = data[:, at : at + 4], at + 4
        q = _join_nibbles(data[:, at:])
        if qh is not None:
            q = q | _read_high_bits(qh)
        if kind == "sym":
            return d * (q.to(torch.float32) - 2 ** (bits - 1))
        return d * q.to(torch.float32) + _fp16_read(data[:, 2:4])

    @classmethod
    def peak(cls, spec, parts):
        """Largest decoded |value| per block, from its fp16 d (and m), with decode's arithmetic.

        Exact: q8's absmax element takes code +-127; the signed max takes code 0, -2^(b-1) d;
        an asym block's min and max take codes 0 and 2^b - 1 (d >= 0: the extremes).
        """
        import torch

        kind, bits = spec.param("kind"), spec.bits
        data = parts["data"]
        d = _fp16_read(data[:, :2]).view(-1)  # (n_blocks,)
        if kind == "q8":
            return d.abs_().mul_(127)
        if kind == "sym":
            return d.abs_().mul_(2 ** (bits - 1))
        m = _fp16_read(data[:, 2:4]).view(-1)
        return torch.maximum((d * (2**bits - 1) + m).abs(), m.abs())

    @classmethod
    def peak_max(cls, spec, parts):
        """max(peak(...)) in one strided pass over the fp16 d (the check's common case), or None.

        q8 and sym peaks grow with |d|, and fp16 -> fp32 is exact, so the largest |d| decides.
        """
        import torch

        kind = spec.param("kind")
        if kind == "asym":
            return None
        lo, hi = torch.aminmax(parts["data"].view(torch.float16)[:, 0])  # (n_blocks,) strided view, no copy
        top = torch.maximum(lo.abs(), hi.abs()).to(torch.float32)  # NaN propagates
        return top * (127 if kind == "q8" else 2 ** (spec.bits - 1))


# the formats, with the kind of each (spec.param("kind")): lowbit.formats.catalog
