"""Float formats as bit fields: range facts against torch.finfo / ml_dtypes, and exact rounding
against torch's and ml_dtypes' casts, code for code."""

import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.formats.floats import FLOATS, round_value

FINFO = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
         "fp8_e4m3fn": ml_dtypes.float8_e4m3fn, "fp8_e5m2": ml_dtypes.float8_e5m2, "fp4_e2m1": ml_dtypes.float4_e2m1fn}
NUMPY = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16, "fp8_e4m3fn": ml_dtypes.float8_e4m3fn,
         "fp8_e5m2": ml_dtypes.float8_e5m2, "fp4_e2m1": ml_dtypes.float4_e2m1fn}


@pytest.mark.parametrize("name", FINFO)
def test_range_facts_are_finfos(name):
    f, dtype = FLOATS[name], FINFO[name]
    info = torch.finfo(dtype) if isinstance(dtype, torch.dtype) else ml_dtypes.finfo(dtype)
    assert float(f.max_finite) == float(info.max)
    assert float(f.smallest_normal) == float(info.smallest_normal)
    assert float(f.smallest_subnormal) == float(ml_dtypes.finfo(NUMPY[name]).smallest_subnormal)
    assert float(f.epsilon) == float(info.eps)


def test_tf32_facts_by_hand():
    # fp32's 8 exponent bits with 10 mantissa bits (NVIDIA A100 whitepaper, "TF32")
    f = FLOATS["tf32"]
    assert float(f.epsilon) == 2**-10 and float(f.smallest_normal) == 2**-126
    assert float(f.smallest_subnormal) == 2**-136 and float(f.max_finite) == (2 - 2**-10) * 2**127


def _code(name, x):
    """The cast's bit pattern of float32 value ``x`` as an int (ml_dtypes / numpy)."""
    with np.errstate(over="ignore"):  # past the range is tested too
        a = np.array([x], dtype=np.float32).astype(NUMPY[name])
    width = {1: np.uint8, 2: np.uint16, 4: np.uint32}[a.itemsize]
    code = int(a.view(width)[0])
    return code & 0xF if name == "fp4_e2m1" else code  # ml_dtypes keeps fp4 in the low nibble of a byte


@pytest.mark.parametrize("name", NUMPY)
def test_rounding_is_the_casts_code_for_code(name):
    g = np.random.default_rng(0)
    top = float(FLOATS[name].max_finite)
    x = np.concatenate([g.standard_normal(3000) * 10.0 ** g.integers(-8, 6, 3000),
                        g.uniform(-1.2, 1.2, 500) * min(top, 2.8e38)]).astype(np.float32)  # incl. past the range
    if name == "fp8_e5m2":
        # ties exactly on fp8 midpoints: the float32 values halfway between two codes
        x = np.concatenate([x, np.array([1.125, 1.375, 2.5, 57344.0 * 1.0625, 61440.0], dtype=np.float32)])
    f = FLOATS[name]
    for v in x:
        r = round_value(Fraction(float(v)), f)
        assert r.code(f) == _code(name, v), (name, float(v))
        if math.isfinite(r.value):
            assert r.value == float(np.array([v], dtype=np.float32).astype(NUMPY[name]).astype(np.float64)[0])


@pytest.mark.parametrize("name", ["fp32", "fp16", "bf16"])
def test_rounding_matches_torch_casts(name):
    x = torch.randn(2000, dtype=torch.float32) * torch.logspace(-40, 30, 2000)
    dtype = FINFO[name]
    expect = x.to(dtype).to(torch.float64)
    for v, e in zip(x.tolist(), expect.tolist(), strict=True):
        assert round_value(Fraction(v), FLOATS[name]).value == e


def test_tf32_is_fp32_rounded_to_ten_mantissa_bits():
    # tf32 from fp32 bits: add half an ulp of the 13 dropped bits (ties to even), clear them
    x = (torch.randn(4000) * torch.logspace(-30, 30, 4000)).to(torch.float32)
    bits = x.view(torch.int32).to(torch.int64)
    rounded = ((bits + 0xFFF + ((bits >> 13) & 1)) & ~0x1FFF).to(torch.int32).view(torch.float32)
    for v, e in zip(x.tolist(), rounded.tolist(), strict=True):
        assert round_value(Fraction(v), FLOATS["tf32"]).value == e


def test_pi_by_hand():
    pi = Fraction("3.1415926535")
    stored = {n: round_value(pi, FLOATS[n]).value for n in FLOATS}
    assert f"{stored['fp32']:.9g}" == "3.14159274"
    assert stored["bf16"] == stored["fp16"] == stored["tf32"] == 3.140625
    assert stored["fp8_e4m3fn"] == 3.25 and stored["fp8_e5m2"] == 3.0 and stored["fp4_e2m1"] == 3.0


def test_decimals_round_once_from_their_exact_value():
    # 1 + 2^-24 + 10^-30 is above fp32's midpoint 1 + 2^-24; through float64 it would be the tie, rounding to 1
    x = 1 + Fraction(1, 2**24) + Fraction(1, 10**30)
    assert round_value(x, FLOATS["fp32"]).value == 1 + 2**-23
    assert round_value(Fraction(float(x)), FLOATS["fp32"]).value == 1.0


@pytest.mark.parametrize("name, inf, nan", [
    ("fp32", math.inf, math.nan), ("fp8_e4m3fn", math.nan, math.nan), ("fp8_e5m2", math.inf, math.nan),
    ("fp4_e2m1", 6.0, -0.0)])
def test_specials_follow_ml_dtypes(name, inf, nan):
    f = FLOATS[name]
    for x, expect in ((math.inf, inf), (math.nan, nan), (2 * float(f.max_finite), inf)):
        got = round_value(x if not math.isfinite(x) else Fraction(x), f)
        with np.errstate(over="ignore"):  # the overflow is what is tested
            ref = np.array([x], dtype=np.float64).astype(NUMPY[name]).astype(np.float64)[0]
        assert (math.isnan(got.value) and math.isnan(ref)) or got.value == ref == expect
        assert (math.isnan(got.value) and math.isnan(expect)) or got.value == expect
