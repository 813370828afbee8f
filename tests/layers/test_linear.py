"""QuantLinear on its own: same numbers as F.linear on the dequantized weight, in every mode."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit import QuantLinear, dispatch, quantize


def _layer(bias=True, fmt="nf4", shape=(24, 64)):
    torch.manual_seed(0)
    linear = nn.Linear(shape[1], shape[0], bias=bias)
    return linear, QuantLinear.from_linear(linear, quantize(linear.weight, fmt))


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("fmt", ["nf4", "int4", "fp8_e4m3fn"])
def test_forward_is_linear_on_the_dequantized_weight(bias, fmt):
    linear, q = _layer(bias, fmt)
    x = torch.randn(3, 5, 64)
    expected = F.linear(x, q.qweight.dequantize(), linear.bias)
    with dispatch.use("reference"):  # the fused kernel sums in its own order (tests/kernels)
        assert torch.equal(q(x), expected)
    torch.testing.assert_close(q(x), expected)
    assert (q.in_features, q.out_features) == (64, 24)
    assert not hasattr(q, "weight")  # no fp32 weight left behind to be read by mistake
    assert [n for n, _ in q.named_parameters()] == (["bias"] if bias else [])


def test_materialized_weights_give_bitwise_equal_outputs():
    _, q = _layer()
    x = torch.randn(4, 64)
    with dispatch.use("reference"):  # the fused kernel matches to float32 rounding, not the bit
        packed = q(x)
    q.materialize()
    assert q.materialized and torch.equal(q(x), packed)
    with dispatch.use("reference"):
        assert torch.equal(q.release()(x), packed) and not q.materialized


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_output_follows_the_input_dtype(dtype):
    linear, q = _layer()
    x = torch.randn(2, 64).to(dtype)
    y = q(x)
    assert y.dtype == dtype
    assert torch.equal(y, F.linear(x, q.qweight.dequantize(dtype), linear.bias.to(dtype)))


def test_dtype_casts_leave_the_packed_parts_alone():
    _, q = _layer()
    before = {k: t.clone() for k, t in q.qweight.parts.items()}
    q.half()
    assert q.bias.dtype == torch.float16  # the bias behaves as in nn.Linear
    for k, t in q.qweight.parts.items():
        assert t.dtype == before[k].dtype and torch.equal(t, before[k])
    q.to("cpu")  # a device move to where it already is changes nothing
    assert q.qweight.parts.keys() == before.keys()


def test_shape_mismatches_are_rejected():
    linear, q = _layer()
    with pytest.raises(ValueError, match="layer shape"):
        QuantLinear.from_linear(nn.Linear(8, 8), q.qweight)
    with pytest.raises(ValueError, match="bias shape"):
        QuantLinear(q.qweight, torch.zeros(3))
    with pytest.raises(ValueError, match="2-D"):
        QuantLinear(quantize(torch.randn(64), "nf4"))


def test_repr_names_the_format():
    assert "format=nf4" in repr(_layer()[1])
