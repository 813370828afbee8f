"""The block-scale encodings MX and NVFP4 store: E8M0 powers of two and E4M3 scales, exact against ml_dtypes
and torch's casts (docs/formats.md#microscaling-mx, docs/formats.md#nvfp4)."""

import math

import ml_dtypes
import numpy as np
import torch

from lowbit.formats.scale_encodings import (
    e4m3_decode,
    e4m3_encode,
    e8m0_decode,
    e8m0_encode,
    e8m0_reciprocal,
    floor_log2,
)


def test_e8m0_matches_ml_dtypes_and_is_exact():
    codes = torch.arange(256, dtype=torch.uint8)
    ref = codes.numpy().view(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    ours = e8m0_decode(codes).numpy()
    assert np.array_equal(ours, ref, equal_nan=True)  # code 0 is 2^-127, 0xFF is NaN
    assert ours[0] == 2.0**-127 and math.isnan(ours[255])
    assert torch.equal(e8m0_reciprocal(codes[:255]) * e8m0_decode(codes[:255]), torch.ones(255))
    assert e8m0_encode(torch.tensor([-200, -127, 0, 127, 300])).tolist() == [0, 0, 127, 254, 254]


def test_floor_log2_is_exact_near_powers_of_two():
    x = torch.tensor([1.0, np.nextafter(np.float32(1), np.float32(0)), np.nextafter(np.float32(8), np.float32(0)),
                      2.0**-149, 2.0**-127, 3e38, 6.0, 7.0])
    assert floor_log2(x).tolist() == [0, -1, 2, -149, -127, 127, 2, 2]


def test_e4m3_encode_equals_torch_cast():
    torch.manual_seed(0)
    x = torch.cat([torch.exp2(torch.empty(20000).uniform_(-10, math.log2(448))), torch.tensor([0.0, 448.0])])
    ref = x.to(torch.float8_e4m3fn).view(torch.uint8)
    assert torch.equal(e4m3_encode(x), ref)
    assert torch.equal(e4m3_decode(ref), x.to(torch.float8_e4m3fn).float())
    assert e4m3_encode(torch.tensor([500.0, 1e9])).tolist() == [0x7E, 0x7E]  # saturates, never NaN
