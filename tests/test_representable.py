"""Finite input a format cannot hold raises, naming the block; just inside its range it quantizes.

Largest magnitudes are derived by hand below from each format's arithmetic (fp16 overflows
at 65520: 65504 plus half its ulp of 32, rounding to even goes to inf).
"""

import math
import re

import numpy as np
import pytest
import torch

import lowbit
from lowbit import dispatch
from lowbit.errors import UnrepresentableError
from lowbit.representable import largest_magnitude, overflow_threshold, probe_units

ALL = lowbit.formats()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PATHS = ["kernels", "reference"]
FP16_OVERFLOW = 65520.0  # IEEE binary16: max 65504 + ulp 32 / 2


def run(path, fn):
    if path == "reference":
        with dispatch.use("reference"):
            return fn()
    return fn()


def below(v: float, np_dtype=np.float32) -> float:
    """The largest float32 (or np_dtype) value strictly below v > 0."""
    f = np_dtype(v)
    while f >= v:
        f = np.nextafter(f, np_dtype(0))
    return float(f)


def block_of(err: UnrepresentableError) -> int:
    return int(str(err).split("block ")[1].split(" ")[0])


@pytest.mark.parametrize("path", PATHS)
def test_q4_0_scale_past_fp16_raises_naming_the_block(path):
    x = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.1
    x[2, 37] = 6e5  # d = 6e5 / -8 = -75000: past fp16, stored as -inf before
    pattern = (r"^q4_0 cannot hold block 5 \(x\.flatten\(\)\[160:192\], x\[2, 32\] to x\[2, 63\], max \|x\| 600000\)"
               r".* holds magnitudes up to 524159\.97 in float32$")
    with pytest.raises(UnrepresentableError, match=pattern) as info:
        run(path, lambda: lowbit.quantize(x, "q4_0"))
    assert isinstance(info.value, ValueError) and "\n" not in str(info.value)
    # allow_nonfinite keeps the unchecked behaviour: the block decodes to inf
    raw = run(path, lambda: lowbit.quantize(x, "q4_0", allow_nonfinite=True).dequantize())
    assert not torch.isfinite(raw[2, 32:]).any() and torch.isfinite(raw[2, :32]).all()


@pytest.mark.parametrize("path", PATHS)
def test_q8_0_fp16_max_raises_naming_the_block(path):
    x = (torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.1).half()
    x[1, 3] = 65504  # d = fp16(65504 / 127) = 516 and 127 * 516 = 65532: inf in fp16
    pattern = (r"^q8_0 cannot hold block 2 \(x\.flatten\(\)\[64:96\], x\[1, 0\] to x\[1, 31\], max \|x\| 65504\): "
               r"its largest dequantized value 65532 is inf in float16; q8_0 holds magnitudes up to 65472 in float16$")
    with pytest.raises(UnrepresentableError, match=pattern):
        run(path, lambda: lowbit.quantize(x, "q8_0"))
    x[1, 3] = 65472  # 65472 / 127 -> 515.5, 127 * 515.5 = 65468.5
    out = run(path, lambda: lowbit.quantize(x, "q8_0").dequantize())
    assert out.dtype == torch.float16 and torch.isfinite(out).all()


# (format, dtype, largest magnitude), each from the format's arithmetic:
HAND = [
    ("q4_0", torch.float32, below(8 * FP16_OVERFLOW)),  # fp16 d = m / -8
    ("q5_0", torch.float32, below(16 * FP16_OVERFLOW)),  # d = m / -16
    ("q8_0", torch.float32, below(127 * FP16_OVERFLOW)),  # d = amax / 127
    ("q4_1", torch.float32, below(FP16_OVERFLOW)),  # fp16 m = the block minimum
    ("q5_1", torch.float32, below(FP16_OVERFLOW)),
    ("q8_0", torch.float16, 65472.0),  # 127 * fp16(65504 / 127) = 127 * 516 = 65532
    ("q4_1", torch.float16, 65472.0),  # [65504, 0]: 15 * fp16(65504 / 15) = 15 * 4368 = 65520
    ("q5_1", torch.float16, 65472.0),  # [65504, 0]: 31 * fp16(65504 / 31) = 31 * 2114 = 65534
    ("ternary", torch.float32, torch.finfo(torch.float32).max / 64),  # float32 sum of a block of 64 equal |x|
    *[(f"int{b}_asym", torch.float32, below(2.0**127)) for b in (2, 4, 8)],  # max - min = 2M finite
    # +-M: the zero point rounds half to even, so one end decodes half a step past M: M (1 + 1 / (2^b - 1))
    *[(f"int{b}_asym", torch.float16, below(FP16_OVERFLOW * (2**b - 1) / 2**b, np.float16)) for b in range(2, 9)],
    *[(f, dt, torch.finfo(dt).max) for f in ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxint8", "nvfp4",
                                             "nf4", "bnb_fp4", "fp4_e2m1", "fp8_e5m2", "int4"] for dt in DTYPES],
]


@pytest.mark.parametrize("fmt,dtype,expected", HAND, ids=[f"{f}-{str(d)[6:]}" for f, d, _ in HAND])
def test_largest_magnitude_by_hand(fmt, dtype, expected):
    assert largest_magnitude(lowbit.get_format(fmt), dtype) == expected


def probes(m: float, block: int, dtype: torch.dtype) -> torch.Tensor:
    """largest_magnitude's probe blocks (lone +-m, a +-m pair, all m, seeded random) at max |x| = m."""
    return (probe_units(block) * m).to(dtype)


def next_up(v: float, dtype: torch.dtype) -> float:
    ints = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    return float((torch.tensor(v, dtype=dtype).view(ints) + 1).view(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ALL)
def test_at_the_limit_finite_above_it_raises(fmt, dtype):
    spec = lowbit.get_format(fmt)
    m = largest_magnitude(spec, dtype)
    out = lowbit.quantize(probes(m, spec.default_block_size, dtype), fmt).dequantize()
    assert out.dtype == dtype and torch.isfinite(out).all()
    if m == torch.finfo(dtype).max:
        return
    above = probes(next_up(m, dtype), spec.default_block_size, dtype)
    with pytest.raises(UnrepresentableError, match=re.escape(f"holds magnitudes up to {m:.8g} in")):
        lowbit.quantize(above, fmt)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fmt", ALL)
def test_raises_exactly_where_the_unchecked_result_is_not_finite(fmt, dtype, path):
    """Random blocks within 5% of the limit: the error names the first block that the
    unchecked quantizer (allow_nonfinite=True) stores or decodes as inf / NaN, and there is
    an error whenever there is such a block. At finfo.max for formats that never overflow."""
    spec = lowbit.get_format(fmt)
    block, m = spec.default_block_size, largest_magnitude(spec, dtype)
    g = torch.Generator().manual_seed(ALL.index(fmt) * len(DTYPES) + DTYPES.index(dtype))
    base = torch.randn(24, block, generator=g, dtype=torch.float64)
    base[8:16] = base[8:16].abs()  # one-signed blocks set an asymmetric format's minimum
    base[16:] = -base[16:].abs()
    base /= base.abs().amax(dim=1, keepdim=True)
    scale = m * torch.empty(24, 1, dtype=torch.float64).uniform_(0.95, 1.05, generator=g)
    x = (base * scale).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    raw = run(path, lambda: lowbit.quantize(x, fmt, allow_nonfinite=True).dequantize())
    bad = (~torch.isfinite(raw)).any(dim=1).nonzero().flatten().tolist()
    try:
        run(path, lambda: lowbit.quantize(x, fmt))
        named = None
    except UnrepresentableError as e:
        named = block_of(e)
    assert named == (bad[0] if bad else None)


def test_double_quant_overflow_raises():
    x = torch.full((4, 64), 1e38)  # nf4 alone holds it; the fp32 mean of the scales overflows
    assert torch.equal(lowbit.quantize(x, "nf4").dequantize(), x)
    with pytest.raises(UnrepresentableError, match=r"^nf4 with double_quant cannot hold block 0 \("):
        lowbit.quantize(x, "nf4", double_quant=True)


def test_overflow_threshold():
    assert overflow_threshold(torch.float32) == math.inf
    assert overflow_threshold(torch.float16) == FP16_OVERFLOW
    bf16 = overflow_threshold(torch.bfloat16)
    assert torch.tensor(bf16).to(torch.bfloat16).isinf() and not torch.tensor(below(bf16)).bfloat16().isinf()
    assert torch.tensor(FP16_OVERFLOW).half().isinf() and not torch.tensor(below(FP16_OVERFLOW)).half().isinf()
