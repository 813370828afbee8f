"""Minifloat formats (ExMy codes, an absmax scale per block): every code against ml_dtypes, rounding through
quantize, error bounds. ExMy's own arithmetic: test_exmy.py.

Rules: docs/formats.md#minifloats-exmy.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

import lowbit
from lowbit.formats.exmy import ExMy
from lowbit.scaling.packing import unpack_codes

from .helpers import ml_cast, ml_values, rounding_probe

MINIFLOATS = ["fp4_e2m1", "fp4_e3m0", "fp4_e1m2", "fp4_e0m3", "fp8_e4m3fn", "fp8_e5m2"]
ML_DTYPES = {
    "fp8_e4m3fn": ml_dtypes.float8_e4m3fn,
    "fp8_e5m2": ml_dtypes.float8_e5m2,
    "fp4_e2m1": ml_dtypes.float4_e2m1fn,
}


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


@pytest.mark.parametrize("fmt", list(ML_DTYPES))
def test_rounding_equals_ml_dtypes_cast(fmt):
    """Quantize with a scale of exactly 1: every block's absmax is the format's max."""
    spec = lowbit.get_format(fmt)
    ex = ExMy(*(spec.param(k) for k in ("exp_bits", "man_bits", "specials")))
    x = rounding_probe(ex)
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
