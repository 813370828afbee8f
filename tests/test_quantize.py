"""The public API on every registered format: shapes, dtypes, bytes, bad input."""

import pytest
import torch

import lowbit

ALL = lowbit.formats()


def test_format_names_are_the_documented_ones():
    expected = (
        [f"int{b}" for b in range(2, 9)] + [f"int{b}_asym" for b in range(2, 9)] + [f"nf{b}" for b in range(2, 9)]
        + ["fp4_e2m1", "fp4_e3m0", "fp4_e1m2", "fp4_e0m3", "bnb_fp4", "fp8_e4m3fn", "fp8_e5m2"]
        + ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxint8", "nvfp4"]
        + ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "q4_k", "q6_k", "ternary"]
        + [f"qq{b}" for b in range(2, 9)] + [f"lloyd{b}" for b in range(2, 9)]  # learned codebooks (issue 8)
        + ["fp16", "bf16"]  # plain casts (issue 13)
    )
    assert sorted(ALL) == sorted(expected)


@pytest.mark.parametrize("fmt", ALL)
def test_spec_is_frozen_data(fmt):
    spec = lowbit.get_format(fmt)
    assert spec.name == fmt and spec.bits >= 1 and spec.default_block_size >= 1
    with pytest.raises(AttributeError):
        spec.bits = 3


@pytest.mark.parametrize("fmt", ALL)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_shape_dtype_bytes(fmt, dtype):
    x = (torch.randn(4, 512) * 0.05).to(dtype)
    q = lowbit.quantize(x, fmt)
    out = q.dequantize()
    assert out.shape == x.shape and out.dtype == dtype
    assert q.format.name == fmt and q.shape == x.shape
    assert len(q.tobytes()) == q.nbytes
    assert q.bits_per_weight == 8 * q.nbytes / x.numel()
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("fmt", ALL)
def test_all_zero_and_empty(fmt):
    block = lowbit.get_format(fmt).default_block_size
    z = torch.zeros(2, block * 2)
    out = lowbit.quantize(z, fmt).dequantize()
    assert torch.equal(out, z) and not out.signbit().any() or (out == 0).all()
    empty = lowbit.quantize(torch.zeros(0, block), fmt)
    assert empty.dequantize().shape == (0, block) and empty.nbytes == 0


@pytest.mark.parametrize("fmt", [f for f in ALL if not lowbit.get_format(f).row_blocks])
def test_block_larger_than_tensor_and_odd_sizes(fmt):
    for n in (1, 3, 31, 33, 1001):
        x = torch.randn(n)
        q = lowbit.quantize(x, fmt, **({} if lowbit.get_format(fmt).fixed_block_size else {"block_size": 4096}))
        out = q.dequantize()
        assert out.shape == x.shape and torch.isfinite(out).all()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_nonfinite_input_names_the_index(bad):
    x = torch.zeros(3, 64)
    x[1, 5] = bad
    with pytest.raises(ValueError, match=r"index \(1, 5\)"):
        lowbit.quantize(x, "nf4")
    lowbit.quantize(x, "int8", allow_nonfinite=True)  # documented escape hatch


def test_non_float_dtype():
    with pytest.raises(TypeError, match="floating"):
        lowbit.quantize(torch.arange(64), "nf4")


def test_unknown_format_lists_close_names():
    with pytest.raises(ValueError, match="nf4"):
        lowbit.quantize(torch.zeros(64), "nf44")
    with pytest.raises(ValueError, match="q4_0"):
        lowbit.get_format("q4-O")


def test_double_quant_only_for_fp32_scales():
    with pytest.raises(ValueError, match=r"\+dq \(double quantization\) does not apply to int4_asym: it stores"):
        lowbit.quantize(torch.zeros(64), "int4_asym", double_quant=True)


def test_bad_block_size():
    with pytest.raises(ValueError, match="block_size"):
        lowbit.quantize(torch.zeros(64), "nf4", block_size=0)
