"""Every fast kernel gives exactly the reference path's bytes and values."""

import math

import pytest
import torch

import lowbit
from lowbit import dispatch, kernels

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="C kernels not built")


def both(x, fmt, **kw):
    fast = lowbit.quantize(x, fmt, **kw)
    with dispatch.use("reference"):
        ref = lowbit.quantize(x, fmt, **kw)
        ref_out = ref.dequantize()
    return fast, ref, ref_out


@pytest.mark.parametrize("fmt", ["nf4", "bnb_fp4"])
@pytest.mark.parametrize("block", [2, 32, 64, 66, 4096])
@pytest.mark.parametrize("n", [1, 2, 63, 64, 4097, 100_001])
def test_codebook4_kernel_matches_reference(fmt, block, n):
    torch.manual_seed(n)
    x = torch.randn(n) * torch.rand(n) ** 4
    x[::97] = 0
    fast, ref, ref_out = both(x, fmt, block_size=block)
    for name in ref.parts:
        assert torch.equal(fast.parts[name], ref.parts[name]), name
    out = fast.dequantize()
    assert torch.equal(out.view(torch.int32), ref_out.view(torch.int32))


@pytest.mark.parametrize("fmt", ["int8", "int4", "int2", "int5"])
@pytest.mark.parametrize("block", [1, 7, 64, 4096])
@pytest.mark.parametrize("n", [1, 63, 64, 4097, 100_001])
@pytest.mark.filterwarnings("ignore::lowbit.errors.LowbitWarning")  # block 1 stores more bits than its input
def test_int_sym_kernel_matches_reference(fmt, block, n):
    torch.manual_seed(n)
    x = torch.randn(n) * torch.rand(n) ** 4
    x[::97] = 0
    x[5::101] = 0.5  # exact halves appear once the scale is a power of two
    fast, ref, ref_out = both(x, fmt, block_size=block)
    for name in ref.parts:
        assert torch.equal(fast.parts[name], ref.parts[name]), name
    assert torch.equal(fast.dequantize().view(torch.int32), ref_out.view(torch.int32))


def test_int8_ties_round_half_to_even_in_kernel():
    x = torch.tensor([127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 126.5, -126.5])
    assert lowbit.quantize(x, "int8", block_size=8).dequantize().tolist() == [127, 0, 2, 2, 0, -2, 126, -126]


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "fp4_e3m0", "fp4_e1m2", "fp4_e0m3", "fp8_e4m3fn", "fp8_e5m2",
                                 "mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "nvfp4"])
def test_minifloat_rounding_kernel_matches_reference(fmt):
    torch.manual_seed(0)
    spec = lowbit.get_format(fmt)
    x = torch.randn(64, 512) * torch.rand(64, 1) * 8
    finite = torch.tensor([v for v in spec.values if math.isfinite(v)])
    mids = (finite.sort().values[1:] + finite.sort().values[:-1]) / 2
    x[0, : mids.numel()] = mids  # exact ties, where rounding to even decides
    x[1] = 0
    fast, ref, ref_out = both(x, fmt)
    for name in ref.parts:
        assert torch.equal(fast.parts[name], ref.parts[name]), name
    assert torch.equal(fast.dequantize().view(torch.int32), ref_out.view(torch.int32))
