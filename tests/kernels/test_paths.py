"""Every fast kernel gives exactly the reference path's bytes and values."""

import math

import pytest
import torch

import lowbit
from lowbit import dispatch, kernels

from ..test_fake_quant import bits

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


@pytest.mark.skipif(kernels.native is None, reason="the C library did not build")
@pytest.mark.parametrize("op_family", sorted(dispatch.registered()), ids=lambda k: "-".join(k))
def test_every_fast_path_matches_the_reference(op_family):
    op, family = op_family
    names = [n for n in lowbit.formats() if lowbit.get_format(n).family == family] or ["fp4_e2m1"]
    if op == "search":  # picks a scale, not bits: it must reach the reference search's error
        torch.manual_seed(4)
        x = torch.randn(96, 256) * torch.rand(256) ** 2
        imp = torch.rand(256) ** 3
        for name in names[:3]:
            errors = []
            for path in ("native", "reference"):
                q = lowbit.quantize(x, name, search="amse", importance=imp, kernels=path)
                errors.append(float(((q.dequantize() - x) ** 2 * imp).sum()))
            assert errors[0] <= errors[1] * 1.03, (name, errors)  # two heuristic scans: within 3%
        return
    if op in ("round", "lut_scale"):  # element-level paths, reached through these families
        names = {"exmy": ["fp4_e2m1", "fp8_e4m3fn", "mxfp4", "nvfp4"], "minifloat": ["fp8_e5m2"],
                 "mx": ["mxfp6_e3m2"], "nvfp4": ["nvfp4"]}[family]
    torch.manual_seed(3)
    x = torch.randn(64, 256) * 3
    for name in names:
        native = lowbit.quantize(x, name, kernels="native")
        reference = lowbit.quantize(x, name, kernels="reference")
        assert native.tobytes() == reference.tobytes(), name
        assert torch.equal(bits(native.dequantize(kernels="native")), bits(reference.dequantize(kernels="reference")))
