"""fp16 / bf16: a plain cast as a format, bit for bit torch's cast, 16 bits per weight."""

import pytest
import torch

import lowbit
from lowbit.errors import UnrepresentableError
from lowbit.planning import QuantPlan


@pytest.mark.parametrize("name, dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_cast_is_torchs_cast_bit_for_bit(name, dtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(33, 70, generator=g) * torch.logspace(-9, 4, 70)  # normals, subnormals, ties
    q = lowbit.quantize(x, name)
    assert q.bits_per_weight == 16 and q.nbytes == 2 * x.numel() and q.block_size == 1
    assert torch.equal(q.dequantize().view(torch.int32), x.to(dtype).float().view(torch.int32))
    assert torch.equal(q.parts["values"].view(torch.int16).reshape(-1), x.to(dtype).view(torch.int16).reshape(-1))


def test_fp16_overflow_is_an_error_not_inf():
    with pytest.raises(UnrepresentableError, match="fp16"):
        lowbit.quantize(torch.tensor([1.0, 70000.0]), "fp16")
    assert lowbit.quantize(torch.tensor([65519.0]), "fp16").dequantize().item() == 65504.0


def test_cast_has_no_other_block_and_no_double_quant():
    with pytest.raises(ValueError, match="fixed block"):
        lowbit.quantize(torch.ones(64), "bf16", block_size=64)
    with pytest.raises(ValueError, match="no scales"):
        lowbit.quantize(torch.ones(64), "bf16", double_quant=True)


def test_cast_formats_in_a_model():
    from lowbit import QuantConfig, quantize_model

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    w = model[0].weight.detach().clone()
    report = quantize_model(model, QuantPlan.uniform(QuantConfig.parse("bf16"), exclude=()))
    assert report.bits_per_weight == 16
    assert isinstance(model[0], lowbit.QuantLinear)
    assert torch.equal(model[0].qweight.dequantize(), w.to(torch.bfloat16).float())
