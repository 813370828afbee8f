"""Plain casts: fp16 and bf16, 16 bits per weight, no scales (docs/formats.md#reference-floats).

What ``model.half()`` or ``model.to(torch.bfloat16)`` does to a weight, as a format, so that
``lowbit compare --formats fp16,bf16`` shows what a half-precision cast alone costs beside the
low-bit formats. Each weight is its own block of one (there is nothing per block to store); the
part ``values`` holds it in the target dtype, rounded by torch's cast (nearest, ties to even;
past the range it is Inf, which ``lowbit.representable`` reports as an overflow).
"""

from __future__ import annotations

import torch

from .registry import Codec, define


class Cast(Codec, family="cast"):
    @classmethod
    def quantize_blocks(cls, spec, blocks, *, partial, tensor_parts):
        return {"values": blocks.to(getattr(torch, spec.param("dtype")))}  # (n, 1)

    @classmethod
    def dequantize_blocks(cls, spec, parts, n_blocks, block):
        return parts["values"].view(n_blocks, block).to(torch.float32)

    @classmethod
    def peak(cls, spec, parts):
        return parts["values"].reshape(-1).abs().to(torch.float32)


FP16 = define("fp16", params=(("dtype", "float16"),), fixed_block_size=True,
              description="IEEE 754 half precision: a plain cast, 16 bits per weight, no scales")
BF16 = define("bf16", params=(("dtype", "bfloat16"),), fixed_block_size=True,
              description="bfloat16: a plain cast (fp32's exponent, 8 bits of precision), 16 bits per weight")
