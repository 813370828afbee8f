"""Integer formats: hand-checked vectors and ties (docs/formats.md#symmetric-integers)."""

import pytest
import torch

import lowbit


def roundtrip(x, fmt, **kw):
    return lowbit.quantize(torch.tensor(x, dtype=torch.float32), fmt, **kw).dequantize()


def test_int8_symmetric_hand_vector():
    # absmax 127 -> scale 1: values round half to even (torch.round), as docs/formats.md#symmetric-integers pins
    x = [127.0, -127.0, 0.5, 1.5, 2.5, -0.5, -2.5, 3.49]
    assert roundtrip(x, "int8", block_size=8).tolist() == [127, -127, 0, 2, 2, -0.0, -2, 3]


def test_int4_narrow_range_never_uses_minus_8():
    x = torch.tensor([-7.0, 7.0, -6.9, 3.0])
    q = lowbit.quantize(x, "int4", block_size=4)
    assert roundtrip(x.tolist(), "int4", block_size=4).tolist() == [-7, 7, -7, 3]
    assert q.parts["codes"].tolist() == [(0 << 4) | 14, (0 << 4) | 10]  # codes q + 7


def test_int_asym_hand_vector():
    # min -1, max 2 -> s = 3/15 = 0.2, z = round(1/0.2) = 5
    x = torch.tensor([-1.0, 2.0, 0.0, 0.1, 0.3])
    q = lowbit.quantize(x, "int4_asym", block_size=5)
    assert q.parts["zeros"].tolist() == [5]
    assert torch.allclose(q.parts["scales"], torch.tensor([0.2]))
    out = q.dequantize()
    assert out[2].item() == 0.0  # zero is exact
    assert torch.allclose(out, torch.tensor([-1.0, 2.0, 0.0, 0.0, 0.4]), atol=1e-6)


def test_int_asym_all_positive_block_is_clamped_and_correct():
    # A naive zero point round(-min/s) = round(-100 / (1/255)) falls far outside [0, 255].
    x = torch.linspace(100.0, 101.0, 64)
    q = lowbit.quantize(x, "int8_asym")
    assert q.parts["zeros"].min() >= 0 and q.parts["zeros"].max() <= 255
    err = (q.dequantize() - x).abs().max().item()
    assert err <= q.parts["scales"].max().item() / 2 * (1 + 1e-5)


@pytest.mark.parametrize("fmt", [f"int{b}" for b in range(2, 9)] + [f"int{b}_asym" for b in range(2, 9)])
def test_all_zero_block(fmt):
    x = torch.zeros(3, 100)
    x[2, 50:] = torch.randn(50)
    out = lowbit.quantize(x, fmt).dequantize()
    assert not out.isnan().any()
    assert (out[:2] == 0).all()
