"""NormalFloat construction (docs/formats.md#normalfloat-and-bitsandbytes-fp4) and ternary."""

import pytest
import torch

import lowbit

NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
]
NF3 = [-1, -0.4786291, -0.2171418, 0, 0.1609301, 0.3379151, 0.5626169, 1]


def test_nf4_table_is_the_spec_table():
    assert list(lowbit.get_format("nf4").values) == NF4


def test_nf3_table():
    assert lowbit.get_format("nf3").values == pytest.approx(NF3, abs=2e-7)


@pytest.mark.parametrize("k", range(2, 9))
def test_nfk_shape(k):
    v = torch.tensor(lowbit.get_format(f"nf{k}").values)
    assert v.numel() == 2**k and v[0] == -1 and v[-1] == 1 and (v == 0).sum() == 1
    assert (v[1:] > v[:-1]).all()
    # asymmetric by construction: one more positive value than negative
    assert (v > 0).sum() == (v < 0).sum() + 1


def test_nf4_ties_go_to_lower_code():
    v = torch.tensor(NF4)
    mid = (v[8] + v[9]) / 2  # float32 midpoint, as bitsandbytes computes it
    q = lowbit.quantize(torch.tensor([1.0, mid.item()]), "nf4", block_size=2)
    assert q.parts["codes"].tolist() == [(15 << 4) | 8]


def test_ternary_absmean():
    x = torch.tensor([2.0, -2.0, 0.1, -0.1, 1.0, 0.0, 0.0, 0.0])  # mean |x| = 0.65
    out = lowbit.quantize(x, "ternary", block_size=8).dequantize()
    assert torch.allclose(out, torch.tensor([0.65, -0.65, 0, 0, 0.65, 0, 0, 0]))


def test_ternary_roundtrip_of_its_own_values():
    # a block of +-s only: absmean = s, so each value is on the grid {-s, 0, s} and exact
    x = torch.tensor([0.75, -0.75, 0.75, 0.75, -0.75, -0.75, 0.75, -0.75])
    assert torch.equal(lowbit.quantize(x, "ternary", block_size=8).dequantize(), x)


def test_ternary_rounds_to_nearest_in_range_and_clips_outside():
    # BitNet b1.58 clips |x| > 1.5 gamma to +-gamma by design: no half-step bound out there
    x = torch.tensor([0.2, 0.4, -0.9, 3.0, 0.0, 0.0, 0.0, 0.0])  # gamma = 0.5625
    out = lowbit.quantize(x, "ternary", block_size=8).dequantize()
    g = 0.5625
    assert torch.allclose(out, torch.tensor([0, g, -g, g, 0, 0, 0, 0]))
