"""Scale search through lowbit.quantize: ordinary stored layout, lower error, clear refusals."""

import pytest
import torch

import lowbit
from lowbit.layers.surgery import QuantConfig


def weighted_error(x, q, w=None):
    e = (q.dequantize() - x) ** 2
    return float((e if w is None else e * w).sum())


@pytest.fixture(scope="module")
def weight(smollm2_weights):
    return next(iter(smollm2_weights.values()))[:256].clone()  # a real (Q4_1-derived) weight matrix slice


@pytest.mark.parametrize("fmt", ["nf4", "int4", "int3", "fp4_e2m1", "int4_asym", "mxfp4", "nvfp4", "ternary", "qq4"])
def test_mse_search_keeps_the_layout_and_lowers_the_error(fmt, weight):
    plain = lowbit.quantize(weight, fmt)
    searched = lowbit.quantize(weight, fmt, search="mse")
    assert {k: (v.dtype, v.shape) for k, v in searched.parts.items()} == \
           {k: (v.dtype, v.shape) for k, v in plain.parts.items()}
    assert searched.nbytes == plain.nbytes
    # @mse weighs each weight's error by its square (llama.cpp's rule without an importance matrix)
    assert weighted_error(weight, searched, weight**2) <= weighted_error(weight, plain, weight**2)


def test_activation_weighted_search_lowers_the_weighted_error(weight):
    torch.manual_seed(0)
    act = torch.rand(weight.shape[-1]) ** 4 * 10  # a few input channels matter most
    w = act.expand_as(weight)
    plain = lowbit.quantize(weight, "nf4", search="mse")
    weighted = lowbit.quantize(weight, "nf4", search="amse", importance=act)
    assert weighted_error(weight, weighted, w) < weighted_error(weight, plain, w)
    assert weighted_error(weight, weighted, w) <= weighted_error(weight, lowbit.quantize(weight, "nf4"), w)


def test_hqq_lowers_the_error_of_zero_point_formats(weight):
    plain = lowbit.quantize(weight, "int4_asym")
    hqq = lowbit.quantize(weight, "int4_asym", search="hqq")
    assert hqq.parts["zeros"].dtype == torch.float16  # a float zero point, as hqq stores it
    assert hqq.nbytes == plain.nbytes + plain.parts["zeros"].numel()  # 2 bytes per block instead of 1
    assert weighted_error(weight, hqq) < weighted_error(weight, plain)
    # the encode adds the float zero before rounding: the stored codes are the nearest levels of that grid
    s, z = hqq.parts["scales"][:, None], hqq.parts["zeros"].float()[:, None]
    q = torch.round(weight.reshape(-1, 64) / s + z).clamp(0, 15)
    torch.testing.assert_close(hqq.dequantize().reshape(-1, 64), (q - z) * s, rtol=0, atol=0)


def test_searched_tensor_with_double_quant_and_partial_block():
    torch.manual_seed(1)
    x = torch.randn(1000) * torch.linspace(0.1, 3, 1000)
    q = lowbit.quantize(x, "nf4", block_size=64, double_quant=True, search="mse")
    assert q.double_quant and q.dequantize().shape == x.shape
    rule = lowbit.quantize(x, "nf4", block_size=64, double_quant=True)
    assert weighted_error(x, q, x**2) <= weighted_error(x, rule, x**2)


@pytest.mark.parametrize(("fmt", "search", "needle"), [
    ("q4_k", "mse", "levels on a grid"),
    ("q4_0", "hqq", "levels on a grid"),
    ("nf4", "hqq", "zero point"),
    ("nf4", "fast", "unknown scale search"),
])
def test_searches_a_format_cannot_take_are_refused(fmt, search, needle):
    with pytest.raises(ValueError, match=needle):
        lowbit.quantize(torch.randn(4, 256), fmt, search=search)
    with pytest.raises(ValueError, match=needle):
        QuantConfig.parse(f"{fmt}@{search}")


def test_importance_is_checked():
    x = torch.randn(8, 64)
    with pytest.raises(ValueError, match="calibration activations"):
        lowbit.quantize(x, "nf4", search="amse")
    with pytest.raises(ValueError, match="does not broadcast"):
        lowbit.quantize(x, "nf4", search="amse", importance=torch.ones(63))
    with pytest.raises(ValueError, match="finite and nonnegative"):
        lowbit.quantize(x, "nf4", search="amse", importance=torch.full((64,), float("nan")))
    with pytest.raises(ValueError, match="does not use importance"):
        lowbit.quantize(x, "nf4", search="mse", importance=torch.ones(64))


@pytest.mark.parametrize("label", ["nf4@", "nf4@mse@hqq", "nf4@mse+dq", "nf4@mse/64"])
def test_bad_search_labels(label):
    with pytest.raises(ValueError, match="goes last and once"):
        QuantConfig.parse(label)


def test_label_round_trip():
    for label in ["nf4@mse", "int4_asym@hqq", "nf4/32+dq@amse", "qq4/128@mse"]:
        assert QuantConfig.parse(label).label == label
    assert QuantConfig.parse("nf4@amse").needs_calibration and not QuantConfig.parse("nf4@mse").needs_calibration
