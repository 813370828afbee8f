"""Microscaling formats (docs/formats.md#microscaling-mx): mxfp4, mxfp6_e2m3, mxfp6_e3m2, mxfp8_e4m3, mxint8, nvfp4.

MX (OCP Microscaling Formats v1.0, §5-§6.3): blocks of 32 share one E8M0 scale
``X = 2^(floor(log2 amax) - emax_elem)``, stored as one uint8 per block (part
``scales_e8m0``). Elements ``x / X`` round to nearest, ties to even, and saturate at the
element's largest finite value. floor(log2) is exact (frexp), not a float32 log2. An
all-zero block takes the smallest exponent, 2^-127 (code 0), and decodes to zeros.

Codes are stored in the core's packing (``lowbit.scaling.packing``: first element in the
high bits), not GGUF's split-half nibbles; the mxfp4 element code order is the same as
GGUF's (``kvalues_mxfp4`` index = E2M1 code), and the scale byte is GGUF's ``e``.

Versus ``gguf.quants.MXFP4`` (= llama.cpp ``quantize_row_mxfp4_ref``), equal on ordinary
data, but it differs in three edge cases (pinned in tests/formats/test_mx.py):
ties go to the smaller magnitude there (first index of the least error), not to even
(0.75 -> 0.5, 1.75 -> 1.5, 3.5 -> 3 at scale 1; OCP and we: 1, 2, 4); its float32
``floor(log2f(amax))`` is 1 too high for the last few float32 values below a power of two
2^k (log2 rounds up to k: none for k in -1..2, 1-2 values for small |k|, 44 near |k| = 127),
giving a scale twice as large; and for amax < 2^-125 its uint8 exponent wraps around
(``(uint8)(floor(log2 amax) - 2 + 127)`` goes negative) instead of clamping to 2^-127.

NVFP4 (NVIDIA; the recipe of pytorch/ao ``torchao/prototype/mx_formats/nvfp4_tensor.py``,
``nvfp4_quantize`` with a per-tensor scale and ``per_tensor_amax_to_scale``): blocks of 16,
E2M1 elements; per tensor ``g = amax / (448 * 6)`` in fp32 (part ``tensor_scale``); per block
``s = E4M3(clamp(amax_block / 6 / g, 2^-6, 448))`` (part ``scales_e4m3``, E4M3 bits; the lower
clamp is torchao's ``E4M3_EPS = finfo(float8_e4m3fn).tiny``); elements
``clamp(x / (g * s), -6, 6)`` rounded to E2M1, ties to even, so a block whose scale rounded
down saturates at 6. Decode ``e2m1[code] * (g * s)`` (torchao's order of the products).
"""

from __future__ import annotations

from functools import cache, cached_property
from typing import TYPE_CHECKING

from .catalog import MX_ELEMENTS
from .exmy import E2M1, E2M3, E3M2, E4M3FN, ExMy
from .levels import MXINT8_FRAC_BITS, MXINT8_VALUES
from .minifloat import decode_table
from .registry import GridCodec
from .scale_encodings import (
    e4m3_decode,
    e4m3_encode,
    e8m0_decode,
    e8m0_encode,
    e8m0_reciprocal,
    floor_log2,
)
from .spec import CODES, PACKED, SCALE, TENSOR_SCALE, Anatomy, Field, FormatSpec

if TYPE_CHECKING:
    import torch

NVFP4_BLOCK = 16  # NVIDIA NVFP4: 16 elements per E4M3 scale
E2M1_MAX = 6.0  # largest E2M1 value (OCP MX v1.0 Table 5)
E4M3_MAX = 448.0  # largest E4M3FN value (OCP OFP8 v1.0)
E4M3_TINY = 2.0**-6  # smallest normal E4M3FN: torchao nvfp4 E4M3_EPS = finfo(float8_e4m3fn).tiny
_EIGHT_BIT_NO_DQ = "double quantization compresses fp32 scales, and these are 8 bits already"


class Int8Element:
    """MXINT8 element (OCP MX v1.0 §5.3.2): 8-bit two's complement, implicit scale 2^-6.

    Values k/64, k = -128..127, emax 0. Like microsoft/microxcaling (``mx/formats.py``:
    int8 ``max_norm = 127/64``) the quantizer saturates symmetrically at +-127/64, so -2.0
    (code 0x80) decodes but is never produced. torch.round rounds half to even.
    """

    bits = 8
    frac_bits = MXINT8_FRAC_BITS
    max_finite = 127 / 64  # the largest magnitude the quantizer produces (-2.0 never is)
    values = MXINT8_VALUES  # code order

    @cached_property
    def value_tensor(self) -> torch.Tensor:
        import torch

        return torch.tensor(self.values, dtype=torch.float32)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        import torch

        k = torch.round(x * 2.0**self.frac_bits).clamp_(-127, 127).to(torch.int32)
        return (k & 0xFF).to(torch.uint8)  # two's complement byte

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        import torch

        return self.value_tensor[codes.to(torch.int64)]


INT8 = Int8Element()
# element name -> (element codec, emax_elem), emax from formats.catalog (OCP MX v1.0 Table 1 / §5.3)
_CODECS: dict[str, ExMy | Int8Element] = {"e2m1": E2M1, "e2m3": E2M3, "e3m2": E3M2, "e4m3": E4M3FN, "int8": INT8}
ELEMENTS: dict[str, tuple[ExMy | Int8Element, int]] = {k: (_CODECS[k], emax) for k, (_, _, emax) in MX_ELEMENTS.items()}


@cache
def _element(spec: FormatSpec) -> tuple[ExMy | Int8Element, int]:
    return ELEMENTS[spec.param("element")]


class Microscaling(GridCodec, family="mx"):
    SCALE_PARTS = ("scales_e8m0",)
    LINEAR_SCALE = False  # the scale is a power of two: nothing to refit

    ANATOMY = Anatomy(
        "one 8-bit E8M0 power-of-two scale X per block", "w = level[q] * X",
        (Field("codes", CODES, "{element} code q of w / X, nearest, ties to even, saturating; " + PACKED,
               per="element"),
         Field("scales_e8m0", SCALE, "E8M0 byte e, X = 2^(e - 127) = 2^(floor(log2 max|w|) - {emax})",
               dtype="uint8")),
        fixed_by="OCP MX v1.0", no_double_quant=_EIGHT_BIT_NO_DQ)

    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None):
        import torch

        _, emax = _element(spec)
        amax = blocks.abs().amax(dim=1)  # (n_blocks,)
        if ratio is not None:
            amax = amax * ratio.to(amax.dtype)
        exp = torch.where(amax > 0, floor_log2(amax) - emax, torch.full_like(amax, -127, dtype=torch.int32))
        return {"scales_e8m0": e8m0_encode(exp)}  # (n_blocks,) uint8, clamped to 2^-127 .. 2^127

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial=False):
        elem, _ = _element(spec)
        return elem.encode(blocks * e8m0_reciprocal(scales["scales_e8m0"])[:, None])  # exact: a power of two

    @classmethod
    def decode(cls, spec, codes, scales):
        elem, _ = _element(spec)
        return decode_table(spec.family, codes, elem.value_tensor, e8m0_decode(scales["scales_e8m0"]))

    @classmethod
    def table_form(cls, spec, parts):
        return _element(spec)[0].value_tensor, cls.multiplier(spec, parts), None

    @classmethod
    def levels(cls, spec, scales):
        elem, _ = _element(spec)
        return elem.value_tensor, -elem.max_finite, elem.max_finite

    @classmethod
    def multiplier(cls, spec, scales):
        return e8m0_decode(scales["scales_e8m0"])

    @classmethod
    def peak(cls, spec, parts):
        """Bound on the decoded |value| per block: the largest element times 2^e. Never inf
        (for any float32 amax, max_elem * 2^(floor(log2 amax) - emax) < 2^128) nor above a
        float16 or bfloat16 input's max (checked for every element type in tests)."""
        elem, _ = _element(spec)
        return elem.max_finite * e8m0_decode(parts["scales_e8m0"])


class NVFP4(GridCodec, family="nvfp4"):
    SCALE_PARTS = ("scales_e4m3",)
    LINEAR_SCALE = False  # an E4M3 byte: nothing to refit in fp32

    ANATOMY = Anatomy(
        "one 8-bit E4M3 scale s per block and one fp32 scale g per tensor", "w = level[q] * s * g",
        (Field("codes", CODES, "E2M1 code q of w / (s * g), nearest, ties to even, saturating; " + PACKED,
               per="element"),
         Field("tensor_scale", TENSOR_SCALE, "fp32 g = max|w| / (448 * 6) over the tensor", per="tensor"),
         Field("scales_e4m3", SCALE, "E4M3 byte s = E4M3(max|w| / 6 / g)", dtype="uint8")),
        fixed_by="NVFP4", no_double_quant=_EIGHT_BIT_NO_DQ)

    @classmethod
    def tensor_parts(cls, spec, flat, block):
        # torchao per_tensor_amax_to_scale: amax / (F8E4M3_MAX * F4_E2M1_MAX), fp32
        return {"tensor_scale": (flat.abs().amax() / (E4M3_MAX * E2M1_MAX)).reshape(1)}

    @classmethod
    def choose_scales(cls, spec, blocks, tensor_parts, ratio=None):
        import torch

        g = tensor_parts["tensor_scale"]  # (1,)
        g_safe = torch.where(g > 0, g, torch.ones_like(g))  # all-zero tensor: no 0 / 0
        amax = blocks.abs().amax(dim=1)
        if ratio is not None:
            amax = amax * ratio.to(amax.dtype)
        block_scale = amax / E2M1_MAX  # (n_blocks,)
        return {"scales_e4m3": e4m3_encode((block_scale / g_safe).clamp(E4M3_TINY, E4M3_MAX))}

    @classmethod
    def encode(cls, spec, blocks, scales, *, partial=False):
        import torch

        total = scales["tensor_scale"] * e4m3_decode(scales["scales_e4m3"])  # (n_blocks,)
        total = torch.where(total > 0, total, torch.ones_like(total))
        return E2M1.encode((blocks / total[:, None]).clamp(-E2M1_MAX, E2M1_MAX))

    @classmethod
    def decode(cls, spec, codes, scales):
        return decode_table(spec.family, codes, E2M1.value_tensor, cls.multiplier(spec, scales))

    @classmethod
    def table_form(cls, spec, parts):
        return E2M1.value_tensor, cls.multiplier(spec, parts), None

    @classmethod
    def multiplier(cls, spec, scales):
        return scales["tensor_scale"] * e4m3_decode(scales["scales_e4m3"])  # torchao's order of the products

    @classmethod
    def peak(cls, spec, parts):
        """Bound on the decoded |value| per block, 6 * g * s; attained by every block whose s is
        448, the tensor's largest (their absmax element scales to >= 432 * 6 / 448 > 5: code 6)."""
        return E2M1_MAX * (parts["tensor_scale"] * e4m3_decode(parts["scales_e4m3"]))
