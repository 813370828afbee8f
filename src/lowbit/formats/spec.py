"""FormatSpec: the frozen facts of one number format, and the words that explain its storage.

Each codec describes the fields its family stores (``Codec.ANATOMY``, in the codec modules); ``anatomy``
fills in one format's numbers. The pieces several families share are here.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field, replace

from ..scaling.dq_layout import DQ_BLOCK
from .registry import codec_for


@dataclass(frozen=True)
class FormatSpec:
    """One registered format.

    ``id`` is written into saved files and never changes meaning. ``family`` names the
    codec that encodes and decodes it; ``params`` holds family-specific frozen settings.
    Ids, bits, blocks and peer type names come from ``lowbit.formats.table``, through
    ``catalog.define``.
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
    """How a format stores a block and decodes an element, in words (for labels and errors).

    A codec's Anatomy is a template: ``anatomy`` fills in {bits} {levels} {qp} {qmax} {vmax} {bytes}
    and the format's params. For GGUF, ``fields`` are llama.cpp ggml-common.h's block_q8_0 ...
    block_q6_K, in struct order.
    """

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


PACKED = "{bits} bits each, packed across the tensor, first element in the high bits"
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
GGUF_NO_DQ = "double quantization compresses separate fp32 scales, and GGUF fixes every byte of its block"


def anatomy(spec: FormatSpec) -> Anatomy:
    """``spec``'s Anatomy, its codec's (``Codec.anatomy_for``), with its numbers filled in."""
    raw = codec_for(spec).anatomy_for(spec)
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
