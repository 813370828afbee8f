"""Fake quantization (QAT's forward): quantize().dequantize() to the bit, with LSQ's gradients."""

import pytest
import torch

import lowbit
from lowbit.fake_quant import fake_quantize, initial_scales
from lowbit.formats.registry import GridCodec, codec_for

GRID = [name for name in lowbit.formats() if issubclass(codec_for(lowbit.get_format(name)), GridCodec)]


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}[t.dtype])


@pytest.mark.parametrize("name", GRID)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fake_quantize_forward_is_dequantize_to_the_bit(name, dtype):
    torch.manual_seed(hash(name) % 1000)
    x = (torch.randn(19, 101) * torch.logspace(-2, 1, 101)).to(dtype)  # a partial trailing block, varied ranges
    x[3, :40] = 0  # an all-zero block
    spec = lowbit.get_format(name)
    expected = lowbit.quantize(x, spec).dequantize()
    got = fake_quantize(x, spec, initial_scales(x, spec))
    assert got.dtype == dtype and torch.equal(bits(got), bits(expected))


def test_fake_quantize_gradients_are_lsq():
    """int4: d out/dx = 1 inside [-Qp s, Qp s]; d out/ds = q - x/s inside, +-Qp at the clip."""
    torch.manual_seed(0)
    x = torch.randn(4, 64)
    scales = initial_scales(x, "int4", block_size=64)
    s = (scales["scales"] * 0.6).requires_grad_(True)  # clip some elements
    xx = x.clone().requires_grad_(True)
    fake_quantize(xx, "int4", {"scales": s}, block_size=64).sum().backward()
    y = x / s.detach()[:, None]
    inside = y.abs() <= 7
    q = torch.round(y).clamp(-7, 7)
    assert torch.equal(xx.grad, inside.float())
    torch.testing.assert_close(s.grad, torch.where(inside, q - y, q).sum(dim=1))


def test_fake_quantize_zero_point_gradient():
    torch.manual_seed(1)
    x = torch.randn(3, 64)
    scales = initial_scales(x, "int4_asym")
    s = scales["scales"].clone().requires_grad_(True)
    z = scales["zeros"].float().requires_grad_(True)
    out = fake_quantize(x, "int4_asym", {"scales": s, "zeros": z})
    assert torch.equal(out, lowbit.quantize(x, "int4_asym").dequantize())
    out.sum().backward()
    assert s.grad is not None and z.grad is not None and torch.isfinite(s.grad).all()


def test_fake_quantize_with_a_float_zero_is_the_hqq_tensor():
    torch.manual_seed(2)
    x = torch.randn(5, 100)  # a partial trailing block
    q = lowbit.quantize(x, "int4_asym", search="hqq")
    scales = {k: v for k, v in q.parts.items() if k != "codes"}
    assert scales["zeros"].dtype == torch.float16
    assert torch.equal(fake_quantize(x, "int4_asym", scales), q.dequantize())


def test_fake_quantize_refuses_gguf_blocks():
    with pytest.raises(ValueError, match="grid format"):
        fake_quantize(torch.zeros(32), "q4_0", {})
