"""ExMy, the minifloat element arithmetic: every value and every rounding against ml_dtypes, ties to even,
saturation where ml_dtypes' casts overflow (docs/formats.md#minifloats-exmy)."""

import math

import ml_dtypes
import numpy as np
import pytest
import torch

from lowbit.formats.exmy import E2M1, E2M3, E3M2, E4M3FN, E5M2, ExMy

from .helpers import ml_cast, ml_values, rounding_probe


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


@pytest.mark.parametrize("fmt", [E2M1, E2M3, E3M2, E4M3FN, E5M2])
def test_exmy_encode_equals_ml_dtypes(fmt):
    dtype = {E2M1: ml_dtypes.float4_e2m1fn, E2M3: ml_dtypes.float6_e2m3fn, E3M2: ml_dtypes.float6_e3m2fn,
             E4M3FN: ml_dtypes.float8_e4m3fn, E5M2: ml_dtypes.float8_e5m2}[fmt]
    x = rounding_probe(fmt)
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
