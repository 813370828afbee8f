"""Every format registered, with what its codec needs besides the table: levels, params, flags, words.

Torch-free, so that `lowbit formats` and `lowbit bits` answer without importing torch (1.3 s):
the registry imports this module on its first lookup, the codec modules (torch-free too, until they
compute) when a codec is asked for, and they read the specs registered here. Ids, bits, blocks and peer
type names: ``formats.table``; the rules behind each family: docs/formats.md.
"""

from __future__ import annotations

from .exmy import E0M3, E1M2, E2M1, E2M3, E3M0, E3M2, E4M3FN, E5M2, ExMy
from .levels import BNB_FP4_VALUES, MXINT8_VALUES, normal_float_values
from .registry import register
from .spec import FormatSpec
from .table import fact


def define(name: str, **extras) -> FormatSpec:
    """Register the format ``name`` of ``lowbit.formats.table`` with its codec's ``extras``
    (values, params, description, ...); id, family, bits and block come from the table."""
    f = fact(name)
    spec = FormatSpec(name=name, id=f.id, family=f.family, bits=f.bits, default_block_size=f.block,
                      block_bytes=f.block_bytes, gguf_type=f.gguf_type, bnb_quant_type=f.bnb_quant_type, **extras)
    return register(spec)


# --- integers (docs/formats.md#symmetric-integers and #zero-point-integers)
for _b in range(2, 9):
    _qp = 2 ** (_b - 1) - 1
    define(f"int{_b}", values=tuple(float(v) for v in range(-_qp, _qp + 1)), double_quant=True,
           description=f"symmetric absmax int{_b}, narrow range [-{_qp}, {_qp}], fp32 scale per block")
    define(f"int{_b}_asym", values=tuple(float(v) for v in range(2**_b)),
           description=f"zero-point uint{_b}, fp32 scale + uint8 zero point per block")

# --- codebooks (docs/formats.md#normalfloat-and-bitsandbytes-fp4)
for _b in range(2, 9):
    define(f"nf{_b}", values=normal_float_values(_b), double_quant=True,
           description=f"NormalFloat{_b} (QLoRA), fp32 absmax per block")
define("bnb_fp4", values=BNB_FP4_VALUES, double_quant=True,
       description="bitsandbytes fp4 (not OCP E2M1), fp32 absmax per block")


# --- minifloats (docs/formats.md#minifloats-exmy)
def _minifloat(name: str, fmt: ExMy, aliases: tuple[str, ...], note: str) -> None:
    define(name, values=fmt.values, double_quant=True, aliases=aliases,
           params=(("exp_bits", fmt.exp_bits), ("man_bits", fmt.man_bits), ("specials", fmt.specials),
                   ("subnormals", fmt.subnormals)),
           description=f"{note}, max {fmt.max_finite:g}, fp32 absmax scale per block, saturating")


_minifloat("fp4_e2m1", E2M1, ("float4_e2m1fn",), "FP4 E2M1 (OCP MXFP4 element), no Inf/NaN")
_minifloat("fp4_e3m0", E3M0, (), "FP4 E3M0, powers of two, no Inf/NaN")
_minifloat("fp4_e1m2", E1M2, (), "FP4 E1M2, uniform, no Inf/NaN")
_minifloat("fp4_e0m3", E0M3, (), "FP4 E0M3, uniform (sign-magnitude int), no Inf/NaN")
_minifloat("fp8_e4m3fn", E4M3FN, ("float8_e4m3fn",), "FP8 E4M3FN (OCP OFP8), NaN only")
_minifloat("fp8_e5m2", E5M2, ("float8_e5m2",), "FP8 E5M2 (OCP OFP8), IEEE-like Inf/NaN")

# --- microscaling (docs/formats.md#microscaling-mx)
MX_BLOCK = 32  # OCP MX v1.0 §5: k = 32 for every concrete MX format
# element name -> (its levels in code order, its bits, emax_elem): OCP MX v1.0 Table 1 / §5.3
MX_ELEMENTS: dict[str, tuple[tuple[float, ...], int, int]] = {
    "e2m1": (E2M1.values, E2M1.bits, 2),
    "e2m3": (E2M3.values, E2M3.bits, 2),
    "e3m2": (E3M2.values, E3M2.bits, 4),
    "e4m3": (E4M3FN.values, E4M3FN.bits, 8),
    "int8": (MXINT8_VALUES, 8, 0),
}


def _mx(name: str, element: str, note: str) -> None:
    values, bits, emax = MX_ELEMENTS[element]
    define(name, values=values, params=(("element", element), ("emax", emax)), fixed_block_size=True,
           description=f"OCP MX {note} elements, block 32, E8M0 scale ({bits + 8 / MX_BLOCK:g} bits/weight)")


_mx("mxfp4", "e2m1", "FP4 E2M1")
_mx("mxfp6_e2m3", "e2m3", "FP6 E2M3")
_mx("mxfp6_e3m2", "e3m2", "FP6 E3M2")
_mx("mxfp8_e4m3", "e4m3", "FP8 E4M3")
_mx("mxint8", "int8", "INT8 (two's complement, 2^-6)")
define("nvfp4", values=E2M1.values, fixed_block_size=True,
       description="NVIDIA NVFP4: E2M1 elements, block 16, E4M3 scale + fp32 per-tensor scale (4.5 bits/weight)")

# --- GGUF blocks (lowbit.gguf): the kind of each legacy type, ggml-quants.c quantize_row_*_ref
for _name, _kind in [("q8_0", "q8"), ("q4_0", "sym"), ("q4_1", "asym"), ("q5_0", "sym"), ("q5_1", "asym")]:
    _bytes = fact(_name).block_bytes
    define(_name, params=(("kind", _kind), ("bytes", _bytes)), fixed_block_size=True, row_blocks=True,
           description=f"GGUF {_name.upper()}: {_bytes} bytes per {fact(_name).block} weights")
define("q4_k", fixed_block_size=True, row_blocks=True,
       description="GGUF Q4_K: 144 bytes per 256 weights (8 sub-blocks, 6-bit scales)")
define("q6_k", fixed_block_size=True, row_blocks=True,
       description="GGUF Q6_K: 210 bytes per 256 weights (16 sub-blocks, int8 scales)")

# --- ternary (BitNet b1.58, arXiv 2402.17764)
define("ternary", values=(-1.0, 0.0, 1.0), double_quant=True,
       description="BitNet b1.58 ternary {-1, 0, 1}, fp32 absmean per block")

# --- learned per-tensor codebooks (docs/formats.md#learned-codebooks)
for _b in range(2, 9):
    define(f"qq{_b}", params=(("fit", "quantile"),), double_quant=True,
           description=f"quantile codebook of {2**_b} levels per tensor (fp32), fp32 absmax per block")
    define(f"lloyd{_b}", params=(("fit", "lloyd"),), double_quant=True,
           description=f"Lloyd-Max codebook of {2**_b} levels per tensor (fp32), fp32 absmax per block")

# --- plain casts (docs/formats.md#reference-floats): each weight is a block of one
define("fp16", params=(("dtype", "float16"),), fixed_block_size=True,
       description="IEEE 754 half precision: a plain cast, 16 bits per weight, no scales")
define("bf16", params=(("dtype", "bfloat16"),), fixed_block_size=True,
       description="bfloat16: a plain cast (fp32's exponent, 8 bits of precision), 16 bits per weight")
