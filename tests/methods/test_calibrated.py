"""One pass for every calibrated method of a plan (methods/calibrated.py) gives, to the bit, what AWQ's fold, the
importance and GPTQ give each as its own pass over the folded model (workflows.run's sequence)."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.calibration.engine import serve
from lowbit.calibration.importance import collect_importance
from lowbit.methods.awq_method import AWQ
from lowbit.methods.calibrated import calibrate_methods, method_layers
from lowbit.methods.gptq_method import GPTQ
from lowbit.planning import QuantConfig, QuantPlan
from lowbit.planning.plan import PlanRule


def tiny_llama(kv_heads: int):
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def batches(vocab=300, n=2, seed=0):
    return [torch.randint(0, vocab, (1, 40), generator=torch.Generator().manual_seed(seed + i)) for i in range(n)]


def mixed_plan():
    """+awq+gptq on block 0's attention, @amse rounding on its own on block 1's MLP, plain GPTQ elsewhere."""
    return QuantPlan((PlanRule("lm_head", None),
                      PlanRule("model.layers.0.self_attn.*", QuantConfig.parse("int4/32+awq+gptq")),
                      PlanRule("model.layers.1.mlp.*", QuantConfig.parse("nf4/32+awq@amse")),
                      PlanRule("*", QuantConfig.parse("int4/32+gptq"))))


def alone(method, model, plan, data):
    """``method``'s part of the pass, run as a pass of its own."""
    consumer = method.consumer(model, plan, method_layers(model, plan)[method])
    serve(model, data, [consumer], progress=False)
    consumer.finish(progress=False)
    return consumer


def one_by_one(model, plan, data, importance_layers, importance_data):
    alone(AWQ, model, plan, data)
    importance = collect_importance(model, importance_data, layers=importance_layers, progress=False)
    return importance, alone(GPTQ, model, plan, data).weights


def scales(model) -> dict:
    """AWQ's ``{layer: s}`` where it folded them (None where it could not)."""
    return {name: s for name, s in model.lowbit_awq.items() if s is not None}


def assert_same(a: dict, b: dict):
    assert list(a) == list(b)
    for name in a:
        x, y = a[name], b[name]
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), name
        else:
            assert x.parts.keys() == y.parts.keys() and all(torch.equal(x.parts[k], y.parts[k]) for k in x.parts), name


@pytest.mark.parametrize("importance_count", [1, 3, None])  # 1: the first of GPTQ's; 3: not (its own pass)
def test_one_pass_equals_the_passes_one_by_one(importance_count):
    model, plan = tiny_llama(2), mixed_plan()
    data = batches(n=2)
    seed = 0 if importance_count == 1 else 5  # 1: data's first window; 3: other windows
    importance_data = data if importance_count is None else batches(n=importance_count, seed=seed)
    layers = ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj",
              "lm_head"]
    reference = copy.deepcopy(model)
    importance, weights = one_by_one(reference, plan, data, layers, importance_data)
    out = calibrate_methods(model, plan, data, importance_layers=layers,
                            importance_batches=None if importance_count is None else importance_data, progress=False)
    assert_same(scales(model), scales(reference))
    assert_same(out.importance, importance)
    assert_same(out.prequantized, weights)
    assert model.lowbit_awq.keys() == reference.lowbit_awq.keys() and scales(model)
    for (name, p), (_, q) in zip(model.state_dict().items(), reference.state_dict().items(), strict=True):
        assert torch.equal(p, q), name  # folded alike


def test_nothing_asked_runs_nothing():
    model = tiny_llama(4)
    out = calibrate_methods(model, QuantPlan.uniform("nf4"), batches(), progress=False)
    assert (out.importance, out.prequantized) == ({}, {}) and not hasattr(model, "lowbit_awq")
