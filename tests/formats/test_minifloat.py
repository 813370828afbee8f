"""Minifloats ExMy: every code against ml_dtypes, rounding, saturation, error bounds.

Rules: docs/formats.md#minifloats-exmy.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import lowbit
from lowbit.formats.exmy import E2M1, E2M3, E3M2, E4M3FN, E5M2, ExMy
from lowbit.scaling.packing import unpack_codes

MINIFLOATS = ["fp4_e2m1", "fp4_e3m0", "fp4_e1m2", "fp4_e0m3", "fp8_e4m3fn", "fp8_e5m2"]
ML_DTYPES = {
    "fp8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


def ml_values(dtype, bits: int) -> np.ndarray:
    """float64 value of every code of an ml_dtypes type (sub-byte types sit in the low bits)."""
    return np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float64)


def ml_cast(x: np.ndarray, dtype) -> np.ndarray:
    return x.astype(np.float32).astype(dtype).astype(np.float64)


def finite_values(fmt: str) -> torch.Tensor:
    return torch.tensor([v for v in lowbit.get_format(fmt).values if math.isfinite(v)], dtype=torch.float32)


@pytest.mark.parametrize("fmt", list(ML_DTYPES))
def test_every_code_matches_ml_dtypes(fmt):
    spec = lowbit.get_format(fmt)
    ours = np.array(spec.values)
    ref = ml_values(ML_DTYPES[fmt], spec.bits)
    assert len(ours) == 2**spec.bits
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    assert np.array_equal(ours, ref, equal_nan=True)
    assert np.array_equal(np.signbit(ours), np.signbit(ref))  # -0 and -Inf included


@pytest.mark.parametrize("fmt, dtype", [(E2M3, ml_dtypes.float6_e2m3fn), (E3M2, ml_dtypes.float6_e3m2fn)])
def test_fp6_elements_match_ml_dtypes(fmt, dtype):
    assert np.array_equal(np.array(fmt.values), ml_values(dtype, 6))


def test_fp8_facts():
    # docs/formats.md#minifloats-exmy: E4M3FN max 448, min normal 2^-6, min subnormal 2^-9, NaN = S.1111.111, no Inf
    v = E4M3FN.values
    assert E4M3FN.max_finite == 448 and v[0x08] == 2**-6 and v[0x01] == 2**-9
    assert [i for i, x in enumerate(v) if math.isnan(x)] == [0x7F, 0xFF]
    assert not any(math.isinf(x) for x in v)
    # E5M2: max 57344, +-Inf = S.11111.00, NaN = S.11111.{01,10,11}
    w = E5M2.values
    assert E5M2.max_finite == 57344 and w[0x7C] == math.inf and w[0xFC] == -math.inf
    assert [i for i, x in enumerate(w) if math.isnan(x)] == [0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF]


@pytest.mark.parametrize(
    "fmt, magnitudes",
    [
        ("fp4_e3m0", [0, 0.25, 0.5, 1, 2, 4, 8, 16]),
        ("fp4_e2m1", [0, 0.5, 1, 1.5, 2, 3, 4, 6]),
        ("fp4_e1m2", [0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5]),
        ("fp4_e0m3", [0, 0.25, 0.5, 0.75, 1, 1.25, 1.5, 1.75]),
    ],
)
def test_spec_positive_magnitudes(fmt, magnitudes):
    values = lowbit.get_format(fmt).values
    assert list(values[:8]) == magnitudes  # codes 0..7, sign bit clear
    assert list(values[8:]) == [-m for m in magnitudes]  # codes 8..15: the same with the sign bit
    assert math.copysign(1, values[8]) == -1  # code 8 is -0: zero is encoded as code 0 (+0)


def test_specs_and_bits_per_weight():
    for fmt in MINIFLOATS:
        spec = lowbit.get_format(fmt)
        assert spec.default_block_size == 64 and spec.double_quant and len(spec.values) == 2**spec.bits
        q = lowbit.quantize(torch.randn(4, 64), fmt)
        assert q.bits_per_weight == spec.bits + 32 / 64
    assert lowbit.get_format("float8_e4m3fn").name == "fp8_e4m3fn"
    assert [lowbit.get_format(f).id for f in MINIFLOATS] == [31, 32, 33, 34, 36, 37]


def _rounding_probe(fmt: ExMy, n: int = 4000) -> np.ndarray:
    """float32 inputs in [-max, max]: log-uniform magnitudes (subnormals too), every
    midpoint between neighbours (exact ties), and the floats just beside each midpoint."""
    rng = np.random.default_rng(0)
    mags = np.array(sorted({abs(v) for v in fmt.values if math.isfinite(v)}), dtype=np.float32)
    mids = (mags[:-1] + mags[1:]) / 2
    lo = math.log2(mags[1]) - 2
    rand = np.exp2(rng.uniform(lo, math.log2(fmt.max_finite), n)).astype(np.float32)
    beside = np.concatenate([np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    x = np.concatenate([rand, mids, beside, mags]).astype(np.float32)
    x = np.clip(x, 0, fmt.max_finite).astype(np.float32)
    return np.concatenate([x, -x])


@pytest.mark.parametrize("fmt", list(ML_DTYPES))
def test_rounding_equals_ml_dtypes_cast(fmt):
    """Quantize with a scale of exactly 1: every block's absmax is the format's max."""
    spec = lowbit.get_format(fmt)
    ex = ExMy(*(spec.param(k) for k in ("exp_bits", "man_bits", "specials")))
    x = _rounding_probe(ex)
    x = np.pad(x, (0, (-len(x)) % 63)).reshape(-1, 63)
    x = np.concatenate([np.full((len(x), 1), ex.max_finite, np.float32), x], axis=1)  # (blocks, 64)
    q = lowbit.quantize(torch.from_numpy(x), fmt)
    assert (q.parts["scales"] == 1).all()
    out = q.dequantize().numpy().astype(np.float64)
    ref = ml_cast(x, ML_DTYPES[fmt])
    assert np.array_equal(out, ref)  # -0 == +0: see below for the sign of zero
    codes = unpack_codes(q.parts["codes"], spec.bits, x.size).numpy().reshape(x.shape)
    ref_codes = x.astype(ML_DTYPES[fmt]).view(np.uint8) & (2**spec.bits - 1)
    nonzero = ref != 0
    assert np.array_equal(codes[nonzero], ref_codes[nonzero])
    assert (codes[~nonzero] == 0).all()  # zero is always the +0 code


@pytest.mark.parametrize("fmt", [E2M1, E2M3, E3M2, E4M3FN, E5M2])
def test_exmy_encode_equals_ml_dtypes(fmt):
    dtype = {E2M1: ml_dtypes.float4_e2m1fn, E2M3: ml_dtypes.float6_e2m3fn, E3M2: ml_dtypes.float6_e3m2fn,
             E4M3FN: ml_dtypes.float8_e4m3fn, E5M2: ml_dtypes.float8_e5m2}[fmt]
    x = _rounding_probe(fmt)
    ours = fmt.decode(fmt.encode(torch.from_numpy(x))).numpy().astype(np.float64)
    assert np.array_equal(ours, ml_cast(x, dtype))


def test_ties_to_even_hand_cases():
    # E2M1: 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -5.0])
    assert E2M1.decode(E2M1.encode(x)).tolist() == [0, 1, 1, 2, 2, 4, 4, -1, -4]
    # E4M3FN around 1 (step 1/8) and at the top (step 32): 1.0625 -> 1, 1.1875 -> 1.25, 432 -> 448
    y = torch.tensor([1.0625, 1.1875, 432.0, 400.0])
    assert E4M3FN.decode(E4M3FN.encode(y)).tolist() == [1.0, 1.25, 448.0, 384.0]


def test_quantizer_saturates_where_ml_dtypes_does_not():
    # docs/formats.md#minifloats-exmy: ml_dtypes' cast of 465 to E4M3FN is NaN, 464 is 448; the encoder saturates.
    x = np.array([464.0, 465.0, 1e6], dtype=np.float32)
    assert ml_cast(x[:1], ml_dtypes.float8_e4m3fn)[0] == 448
    assert np.isnan(ml_cast(x[1:2], ml_dtypes.float8_e4m3fn)[0])
    assert E4M3FN.decode(E4M3FN.encode(torch.from_numpy(x))).tolist() == [448, 448, 448]
    assert math.isinf(ml_cast(np.array([65536.0]), ml_dtypes.float8_e5m2)[0])
    assert E5M2.decode(E5M2.encode(torch.tensor([65536.0, -1e30]))).tolist() == [57344, -57344]


def test_zero_is_positive_zero_code():
    x = torch.tensor([0.0, -0.0, -1e-30, 1e-30])
    assert E4M3FN.encode(x).tolist() == [0, 0, 0, 0]


def test_exmy_flags():
    no_sub = ExMy(2, 2, subnormals=False)  # exponent field 0 is zero only
    assert no_sub.values[:5] == (0.0, 0.0, 0.0, 0.0, 1.0)
    # midpoint 1.125 between codes 4 (1.0) and 5 (1.25): to the even code 4; 1.375 -> 1.5 (code 6)
    assert no_sub.decode(no_sub.encode(torch.tensor([0.4, 0.6, 1.125, 1.375]))).tolist() == [0, 1, 1, 1.5]
    with pytest.raises(ValueError):
        ExMy(4, 3, "fnuz")


@pytest.mark.parametrize("fmt", MINIFLOATS)
def test_all_zero_block_and_partial_block(fmt):
    x = torch.zeros(3, 100)
    x[2, 50:] = torch.randn(50)
    out = lowbit.quantize(x, fmt).dequantize()
    assert not out.isnan().any() and (out[:2] == 0).all()
    assert (out[2, 50:] != 0).any()


@pytest.mark.parametrize("fmt", MINIFLOATS)
def test_representable_values_roundtrip_exactly(fmt):
    values = finite_values(fmt)  # includes +-max, so the scale is exactly the power of two
    for scale in (1.0, 2.0**-7, 2.0**5):
        x = values * scale
        q = lowbit.quantize(x, fmt, block_size=x.numel())
        assert q.parts["scales"].item() == scale
        assert torch.equal(q.dequantize(), x), fmt


@pytest.mark.parametrize("fmt", MINIFLOATS)
def test_error_is_at_most_half_a_step(fmt):
    torch.manual_seed(0)
    x = (torch.randn(64, 64) * torch.rand(64, 1) * 10).reshape(-1, 64)
    q = lowbit.quantize(x, fmt)
    out = q.dequantize()
    grid = q.parts["scales"][:, None] * finite_values(fmt).unique()[None, :]  # (blocks, values)
    nearest = (x[:, :, None] - grid[:, None, :]).abs().amin(dim=2)
    err = (out - x).abs()
    assert (err <= nearest + 1e-6 * x.abs().amax(dim=1, keepdim=True)).all()
    gaps = (grid[:, 1:] - grid[:, :-1]).amax(dim=1, keepdim=True)
    assert (err <= gaps / 2 * (1 + 1e-5)).all()
