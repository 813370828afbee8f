"""Quantization-aware training: prepare, a few steps, convert; the converted model computes what was trained."""

import copy
from dataclasses import replace

import pytest
import torch

from lowbit import QuantConfig, QuantLinear
from lowbit.evaluate import materialize
from lowbit.methods.qat import QATLinear, convert, prepare
from lowbit.methods.qat_train import QATSettings, train
from lowbit.planning import QuantPlan


@pytest.mark.parametrize("label", ["int3/32", "int2_asym/64", "nf4/32", "int4/32+had"])
def test_converted_model_computes_what_was_trained(tiny, label):
    teacher = copy.deepcopy(tiny)
    layers = prepare(tiny, QuantPlan.uniform(label))
    assert len(layers) == 14 and all(isinstance(m, QATLinear) for m in layers.values())
    assert not any(p.requires_grad for n, p in tiny.named_parameters() if "embed" in n or "norm" in n)
    windows = torch.randint(0, 1000, (3, 32), generator=torch.Generator().manual_seed(0))
    first = next(iter(layers.values()))
    before = first.weight.detach().clone(), first.quantizer.scale.detach().clone()
    losses = train(tiny, teacher, windows, QATSettings(steps=4, lr=1e-3, scale_lr=1e-3), progress=False)
    assert len(losses) == 4 and all(x >= 0 for x in losses)
    assert not torch.equal(first.weight, before[0]) and not torch.equal(first.quantizer.scale, before[1])
    ids = windows[:1]
    with torch.no_grad():
        trained = tiny(ids).logits
    report = convert(tiny, QuantPlan.uniform(label))
    assert sum(isinstance(m, QuantLinear) for m in tiny.modules()) == 14 == len(report.layers)
    materialize(tiny)
    with torch.no_grad():
        assert torch.equal(tiny(ids).logits, trained)


def test_refusals():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    for label, message in [("q4_k", "GGUF block format"), ("mxfp4", "as codes"), ("nf4+dq", r"\+dq"),
                           ("int4@mse", "scale search"), ("int8_outlier", "LLM.int8")]:
        with pytest.raises(ValueError, match=message):
            prepare(copy.deepcopy(model), QuantPlan.uniform(label))
    for kwargs, message in [({"steps": 0}, "--steps"), ({"lr": -1.0}, "--lr"), ({"loss": "mse"}, "--loss")]:
        with pytest.raises(ValueError, match=message):
            QATSettings(**({"steps": 1, "lr": 1e-5, "scale_lr": 1e-4} | kwargs))


def test_training_can_start_from_a_quantized_weight(tiny):
    """Seeded with another method's rounding (GPTQ's, here plain int4 with a searched scale), QAT begins at
    exactly what that rounding computes."""
    from lowbit.layers.surgery import linears, quantize_weight

    config = QuantConfig.parse("int4/32")
    start = {names[0]: quantize_weight(m.weight, replace(config, search="mse")) for names, m in linears(tiny)
             if "lm_head" not in names[0]}
    other = copy.deepcopy(tiny)
    layers = prepare(tiny, QuantPlan.uniform(config), start=start)
    for name, layer in layers.items():
        with torch.no_grad():
            assert torch.equal(layer.quantizer(layer.weight), start[name].dequantize())
    with pytest.raises(ValueError, match="cannot seed"):
        prepare(other, QuantPlan.uniform("int4/64"), start=start)
