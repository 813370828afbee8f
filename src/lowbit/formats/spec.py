"""FormatSpec: the frozen facts of one number format, and the words that explain its storage."""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, replace

from ..scaling.dq_layout import DQ_BLOCK


@dataclass(frozen=True)
class FormatSpec:
    """One registered format.

    ``id`` is written into saved files and never changes meaning. ``family`` names the
    codec that encodes and decodes it; ``params`` holds family-specific frozen settings.
    Ids, bits, blocks and peer type names come from ``lowbit.formats.table``, through
    ``registry.define``.
    """

    name: str
    id: int
    family: str
    bits: int  # bits per element code, scales not counted
    default_block_size: int
    values: tuple[float, ...] | None = None  # representable values in code order
    params: tuple[tuple[str, object], ...] = ()
    fixed_block_size: bool = False  # GGUF and MX fix the block; others take any size
    row_blocks: bool = False  # GGUF: every row (last dim) must hold whole blocks
    double_quant: bool = False  # per-block fp32 scale that bnb-style double quant can compress
    description: str = ""
    aliases: tuple[str, ...] = field(default=())
    block_bytes: int | None = None  # bytes per block where the format fixes them (formats.table)
    gguf_type: str | None = None  # GGMLQuantizationType name, where GGUF has this format
    bnb_quant_type: str | None = None  # bitsandbytes quant_type, where bitsandbytes has it

    def param(self, key: str):
        return dict(self.params)[key]

    def __repr__(self) -> str:
        return f"FormatSpec({self.name!r}, bits={self.bits}, block={self.default_block_size})"


# What a stored field is for: `lowbit formats NAME` sums bits per weight by role.
CODES, SCALE, SECOND_LEVEL, TENSOR_SCALE = "codes", "scale", "second-level scale", "tensor scale"

# How the level probe (``Field.probe_bytes``) writes "every element has code q, every scale
# is 1, every minimum 0" into a GGUF block field; the codec's own decoder then reads it.
_FILLS = {
    "fp16 1": lambda q: struct.pack("<e", 1.0),
    "fp16 0": lambda q: struct.pack("<e", 0.0),
    "unit": lambda q: b"\x01",  # int8 sub-scales 1; Q4_K's packed 6-bit scales all 1 (mins: dmin is 0)
    "byte": lambda q: bytes([q]),  # one code per byte (Q8_0: read back as int8)
    "nibbles": lambda q: bytes([(q & 15) * 0x11]),  # low 4 bits, in both nibbles
    "bit4": lambda q: b"\xff" if q & 16 else b"\x00",  # bit 4 of every element (Q5 qh)
    "bits45": lambda q: bytes([((q >> 4) & 3) * 0x55]),  # bits 4-5 of four elements (Q6_K qh)
}


@dataclass(frozen=True)
class Field:
    """One stored field: a part of a QuantizedTensor, or a byte range of a GGUF block.

    ``per``: what one entry covers ("element", "block", "256 blocks", "tensor"); ``nbytes``:
    the field's bytes inside a GGUF block (0 for parts); ``fill``: a ``_FILLS`` key, how the
    level probe writes code q into a GGUF field. A part other than the codes stores ``entries``
    entries of ``dtype`` per ``per`` (`lowbit formats` counts its bits from these;
    tests/commands/test_formats_cmd.py checks them against the parts a codec stores).
    """

    name: str
    role: str
    holds: str
    per: str = "block"
    nbytes: int = 0
    fill: str = ""
    dtype: str = "float32"
    entries: str = "1"

    def probe_bytes(self, code: int) -> bytes:
        one = _FILLS[self.fill](code)
        return one * (self.nbytes // len(one))


@dataclass(frozen=True)
class Anatomy:
    """How a format stores a block and decodes an element, in words (for labels and errors)."""

    scales: str  # what the block scales are
    rule: str  # how one element decodes
    fields: tuple[Field, ...]  # parts in stored order; for GGUF, the block's byte fields
    fixed_by: str = ""  # the standard that fixes the block size, if it is fixed
    no_double_quant: str = ""  # why +dq does not apply (empty where it does)

    @property
    def gguf_block(self) -> bool:
        return any(f.nbytes for f in self.fields)

    @property
    def block_bytes(self) -> int:
        return sum(f.nbytes for f in self.fields)


_PACKED = "{bits} bits each, packed across the tensor, first element in the high bits"
# lowbit.scaling.double_quant (bitsandbytes' compress_statistics layout, docs/formats.md#double-quantization)
DOUBLE_QUANT_FIELDS = (
    Field("scales_q", SECOND_LEVEL, "8-bit code (bitsandbytes' dynamic map) of (scale - offset) / group absmax",
          dtype="uint8"),
    Field("scales_absmax", SECOND_LEVEL, f"fp32 absmax of (scale - offset) over a group of {DQ_BLOCK} block scales",
          per=f"{DQ_BLOCK} blocks"),
    Field("scales_offset", SECOND_LEVEL, "fp32 mean of all block scales", per="tensor"),
)
DOUBLE_QUANT = (f"the fp32 block scales are stored as 8-bit codes in groups of {DQ_BLOCK}, each group with an "
                "fp32 absmax, plus one fp32 mean per tensor (QLoRA double quantization, bitsandbytes' layout)")
_EIGHT_BIT_NO_DQ = "double quantization compresses fp32 scales, and these are 8 bits already"
_GGUF_NO_DQ = "double quantization compresses separate fp32 scales, and GGUF fixes every byte of its block"

# Templates: {bits} {qp} {qmax} {vmax} {bytes} and the format's params are filled in by ``anatomy``.
# GGUF fields: llama.cpp ggml-common.h (block_q8_0 ... block_q6_K), in struct order.
_ANATOMY: dict[str, Anatomy] = {
    "int": Anatomy(
        "an fp32 scale s = max|w| / {qp} per block", "w = (q - {qp}) * s",
        (Field("codes", CODES, "q = round(w / s) + {qp}, " + _PACKED, per="element"),
         Field("scales", SCALE, "fp32 s = max|w| / {qp} (narrow range: code 0 is -{qp})"))),
    "int_asym": Anatomy(
        "an fp32 scale s and a uint8 zero point z per block", "w = (q - z) * s",
        (Field("codes", CODES, "q = round(w / s) + z, clamped to 0..{qmax}, " + _PACKED, per="element"),
         Field("scales", SCALE, "fp32 s = (max - min) / {qmax}, the range widened to include 0"),
         Field("zeros", SCALE, "uint8 zero point z = round(-min / s): the code of 0 (with @hqq: a float16 z, "
                               "q = round(w / s + z), as hqq stores it)", dtype="uint8")),
        no_double_quant="double quantization (bitsandbytes) compresses the absmax of symmetric formats, not a "
                        "scale paired with a zero point"),
    "codebook": Anatomy(
        "an fp32 absmax per block", "w = level[q] * absmax",
        (Field("codes", CODES, "index q of the level nearest w / absmax (ties to the lower), " + _PACKED,
               per="element"),
         Field("scales", SCALE, "fp32 absmax = max|w|"))),
    "learned": Anatomy(
        "an fp32 absmax per block and one codebook of 2^{bits} fp32 levels per tensor", "w = codebook[q] * absmax",
        (Field("codes", CODES, "index q of the codebook level nearest w / absmax (ties to the lower), " + _PACKED,
               per="element"),
         Field("tensor_codebook", TENSOR_SCALE, "2^{bits} fp32 levels learned from the tensor's block-normalised "
               "weights", per="tensor", entries="{levels}"),
         Field("scales", SCALE, "fp32 absmax = max|w|"))),
    "minifloat": Anatomy(
        "an fp32 scale s = max|w| / {vmax} per block", "w = level[q] * s",
        (Field("codes", CODES, "sign-exponent-mantissa code q of w / s, nearest, ties to even, saturating; "
               + _PACKED, per="element"),
         Field("scales", SCALE, "fp32 s = max|w| / {vmax}"))),
    "ternary": Anatomy(
        "an fp32 absmean gamma = mean|w| per block", "w = level[q] * gamma",
        (Field("codes", CODES, "q + 1, q = round(w / gamma) clamped to -1..1, " + _PACKED, per="element"),
         Field("scales", SCALE, "fp32 gamma = mean|w|"))),
    "cast": Anatomy(
        "none: every weight is stored alone", "w = the stored {dtype} value",
        (Field("values", CODES, "the weight cast to {dtype}: nearest, ties to even (Inf past its range)",
               per="element"),),
        fixed_by="a plain cast has nothing per block",
        no_double_quant="there are no scales to compress"),
    "mx": Anatomy(
        "one 8-bit E8M0 power-of-two scale X per block", "w = level[q] * X",
        (Field("codes", CODES, "{element} code q of w / X, nearest, ties to even, saturating; " + _PACKED,
               per="element"),
         Field("scales_e8m0", SCALE, "E8M0 byte e, X = 2^(e - 127) = 2^(floor(log2 max|w|) - {emax})",
               dtype="uint8")),
        fixed_by="OCP MX v1.0", no_double_quant=_EIGHT_BIT_NO_DQ),
    "nvfp4": Anatomy(
        "one 8-bit E4M3 scale s per block and one fp32 scale g per tensor", "w = level[q] * s * g",
        (Field("codes", CODES, "E2M1 code q of w / (s * g), nearest, ties to even, saturating; " + _PACKED,
               per="element"),
         Field("tensor_scale", TENSOR_SCALE, "fp32 g = max|w| / (448 * 6) over the tensor", per="tensor"),
         Field("scales_e4m3", SCALE, "E4M3 byte s = E4M3(max|w| / 6 / g)", dtype="uint8")),
        fixed_by="NVFP4", no_double_quant=_EIGHT_BIT_NO_DQ),
    "q8_0": Anatomy(
        "an fp16 scale d inside each {bytes}-byte block", "w = q * d, q the code byte read as int8",
        (Field("d", SCALE, "fp16 d = max|w| / 127", nbytes=2, fill="fp16 1"),
         Field("qs", CODES, "32 int8 codes q = roundf(w / d), element j in byte j", nbytes=32, fill="byte")),
        fixed_by="GGUF", no_double_quant=_GGUF_NO_DQ),
    "q4_0": Anatomy(
        "an fp16 scale d inside each {bytes}-byte block", "w = (q - 8) * d",
        (Field("d", SCALE, "fp16 d = m / -8, m the value of largest magnitude", nbytes=2, fill="fp16 1"),
         Field("qs", CODES, "32 4-bit codes: element j in the low nibble of byte j, element j+16 in the high nibble",
               nbytes=16, fill="nibbles")),
        fixed_by="GGUF", no_double_quant=_GGUF_NO_DQ),
    "q4_1": Anatomy(
        "an fp16 scale d and an fp16 minimum m inside each {bytes}-byte block", "w = q * d + m",
        (Field("d", SCALE, "fp16 d = (max - min) / 15", nbytes=2, fill="fp16 1"),
         Field("m", SCALE, "fp16 m = min", nbytes=2, fill="fp16 0"),
         Field("qs", CODES, "32 4-bit codes: element j in the low nibble of byte j, element j+16 in the high nibble",
               nbytes=16, fill="nibbles")),
        fixed_by="GGUF", no_double_quant=_GGUF_NO_DQ),
    "q5_0": Anatomy(
        "an fp16 scale d inside each {bytes}-byte block", "w = (q - 16) * d",
        (Field("d", SCALE, "fp16 d = m / -16, m the value of largest magnitude", nbytes=2, fill="fp16 1"),
         Field("qh", CODES, "bit 4 of the 32 5-bit codes: element j at bit j of a little-endian uint32",
               nbytes=4, fill="bit4"),
         Field("qs", CODES, "low 4 bits of the codes: element j in the low nibble of byte j, j+16 in the high",
               nbytes=16, fill="nibbles")),
        fixed_by="GGUF", no_double_quant=_GGUF_NO_DQ),
    "q5_1": Anatomy(
        "an fp16 scale d and an fp16 minimum m inside each {bytes}-byte block", "w = q * d + m",
        (Field("d", SCALE, "fp16 d = (max - min) / 31", nbytes=2, fill="fp16 1"),
         Field("m", SCALE, "fp16 m = min", nbytes=2, fill="fp16 0"),
         Field("qh", CODES, "bit 4 of the 32 5-bit codes: element j at bit j of a little-endian uint32",
               nbytes=4, fill="bit4"),
         Field("qs", CODES, "low 4 bits of the codes: element j in the low nibble of byte j, j+16 in the high",
               nbytes=16, fill="nibbles")),
        fixed_by="GGUF", no_double_quant=_GGUF_NO_DQ),
    "q4_k": Anatomy(
        "fp16 super-scales d and dmin and 6-bit scales and mins for 8 sub-blocks of 32, inside each "
        "{bytes}-byte block", "w = q * (d * sc) - dmin * m, sc and m those of the element's sub-block",
        (Field("d", SCALE, "fp16 d, the step of the 6-bit sub-block scales", nbytes=2, fill="fp16 1"),
         Field("dmin", SCALE, "fp16 dmin, the step of the 6-bit sub-block mins", nbytes=2, fill="fp16 0"),
         Field("scales", SCALE, "8 scales sc and 8 mins m, 6 bits each (llama.cpp get_scale_min_k4 packing)",
               nbytes=12, fill="unit"),
         Field("qs", CODES, "256 4-bit codes, 32 bytes per 64 weights: the first 32 in the low nibbles, the next "
               "32 in the high", nbytes=128, fill="nibbles")),
        fixed_by="GGUF", no_double_quant=_GGUF_NO_DQ),
    "q6_k": Anatomy(
        "16 int8 sub-block scales and an fp16 super-scale d inside each {bytes}-byte block",
        "w = (q - 32) * d * sc, sc that of the element's sub-block of 16",
        (Field("ql", CODES, "low 4 bits of the 256 6-bit codes, two per byte", nbytes=128, fill="nibbles"),
         Field("qh", CODES, "high 2 bits of the codes, four per byte", nbytes=64, fill="bits45"),
         Field("scales", SCALE, "16 int8 sub-block scales sc, one per 16 weights", nbytes=16, fill="unit"),
         Field("d", SCALE, "fp16 d, the step of the sub-block scales", nbytes=2, fill="fp16 1")),
        fixed_by="GGUF", no_double_quant=_GGUF_NO_DQ),
}


def anatomy(spec: FormatSpec) -> Anatomy:
    """``spec``'s Anatomy with its numbers filled in (looked up by name, else by family)."""
    raw = _ANATOMY.get(spec.name) or _ANATOMY[spec.family]
    finite = [abs(v) for v in spec.values or () if math.isfinite(v)]
    facts = {"bits": spec.bits, "levels": 2**spec.bits, "qp": 2 ** (spec.bits - 1) - 1, "qmax": 2**spec.bits - 1,
             "vmax": f"{max(finite):g}" if finite else "?", "bytes": raw.block_bytes, **dict(spec.params)}

    def fill(text: str) -> str:
        return text.format(**facts)

    fields = tuple(replace(f, holds=fill(f.holds), dtype=fill(f.dtype), entries=fill(f.entries)) for f in raw.fields)
    return Anatomy(fill(raw.scales), fill(raw.rule), fields, raw.fixed_by, fill(raw.no_double_quant))


DQ_SUFFIX = "+dq"  # FORMAT[/BLOCK][+dq]: the label suffix that turns double quantization on


def fixed_block_message(spec: FormatSpec, block: int) -> str:
    """Why ``spec`` refuses block ``block``, in the words `lowbit formats` uses."""
    fixed_by = anatomy(spec).fixed_by
    return f"{spec.name} has a fixed block of {spec.default_block_size} weights ({fixed_by}); got block size {block}"


def no_double_quant_message(spec: FormatSpec) -> str:
    """Why ``+dq`` does not apply to ``spec``: what its scales are, in the words `lowbit formats` uses."""
    a = anatomy(spec)
    return f"{DQ_SUFFIX} (double quantization) does not apply to {spec.name}: it stores {a.scales}; {a.no_double_quant}"
