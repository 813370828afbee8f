"""The one table of format facts: the only place a format's id, bits and block are written.

A format id is written into saved files (``lowbit.json``) and never changes meaning.
``block_bytes``: the bytes one block occupies where the format fixes them (GGUF blocks:
llama.cpp ``ggml-common.h`` ``sizeof(block_*)``; MX and NVFP4: the element codes plus the
one-byte scale, OCP MX v1.0 §5.2 and NVIDIA's NVFP4). ``gguf_type``: the name of its
``GGMLQuantizationType`` (gguf-py ``gguf/constants.py``); ``bnb_quant_type``: bitsandbytes'
``quant_type`` argument. Codec modules register their formats by name and read the rest
from here (docs/formats.md#formats-at-a-glance).
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Fact:
    name: str
    id: int
    family: str
    bits: int  # bits per element code
    block: int  # default (or fixed) block size
    block_bytes: int | None = None
    gguf_type: str | None = None
    bnb_quant_type: str | None = None


def _series(prefix: str, first_id: int, family: str, suffix: str = "", bits=range(2, 9), block: int = 64):
    return [Fact(f"{prefix}{b}{suffix}", first_id + b - 2, family, b, block) for b in bits]


FACTS: tuple[Fact, ...] = (
    *_series("int", 1, "int"),  # ids 1..7
    *_series("int", 11, "int_asym", "_asym"),  # ids 11..17
    # bitsandbytes quantize_4bit(quant_type="nf4") is nf4 with block 64
    *(replace(f, bnb_quant_type="nf4") if f.name == "nf4" else f for f in _series("nf", 21, "codebook")),  # 21..27
    Fact("fp4_e2m1", 31, "minifloat", 4, 64),
    Fact("fp4_e3m0", 32, "minifloat", 4, 64),
    Fact("fp4_e1m2", 33, "minifloat", 4, 64),
    Fact("fp4_e0m3", 34, "minifloat", 4, 64),
    Fact("bnb_fp4", 35, "codebook", 4, 64, bnb_quant_type="fp4"),
    Fact("fp8_e4m3fn", 36, "minifloat", 8, 64),
    Fact("fp8_e5m2", 37, "minifloat", 8, 64),
    Fact("mxfp4", 41, "mx", 4, 32, block_bytes=17),  # 32 x 4 bits + E8M0 byte
    Fact("mxfp6_e2m3", 42, "mx", 6, 32, block_bytes=25),
    Fact("mxfp6_e3m2", 43, "mx", 6, 32, block_bytes=25),
    Fact("mxfp8_e4m3", 44, "mx", 8, 32, block_bytes=33),
    Fact("mxint8", 45, "mx", 8, 32, block_bytes=33),
    Fact("nvfp4", 46, "nvfp4", 4, 16, block_bytes=9),  # 16 x 4 bits + E4M3 byte (+ fp32 per tensor)
    Fact("q8_0", 51, "gguf_legacy", 8, 32, block_bytes=34, gguf_type="Q8_0"),
    Fact("q4_0", 52, "gguf_legacy", 4, 32, block_bytes=18, gguf_type="Q4_0"),
    Fact("q4_1", 53, "gguf_legacy", 4, 32, block_bytes=20, gguf_type="Q4_1"),
    Fact("q5_0", 54, "gguf_legacy", 5, 32, block_bytes=22, gguf_type="Q5_0"),
    Fact("q5_1", 55, "gguf_legacy", 5, 32, block_bytes=24, gguf_type="Q5_1"),
    Fact("q4_k", 56, "gguf_q4_k", 4, 256, block_bytes=144, gguf_type="Q4_K"),
    Fact("q6_k", 57, "gguf_q6_k", 6, 256, block_bytes=210, gguf_type="Q6_K"),
    Fact("ternary", 61, "ternary", 2, 64),
    # plain casts (no scales): each weight is a block of one
    Fact("fp16", 91, "cast", 16, 1),
    Fact("bf16", 92, "cast", 16, 1),
    *_series("qq", 72, "learned"),  # ids 72..78: quantile codebooks
    *_series("lloyd", 82, "learned"),  # ids 82..88: Lloyd-Max codebooks
)

_BY_NAME = {f.name: f for f in FACTS}
assert len(_BY_NAME) == len(FACTS) and len({f.id for f in FACTS}) == len(FACTS), "format name or id twice"


def fact(name: str) -> Fact:
    return _BY_NAME[name]
