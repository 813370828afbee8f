"""+awq: input-channel scales folded into the op before leave the full-precision model's output unchanged, and
the chosen scales never give a group more output error than none; refusals are one clear line."""

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

from lowbit.calibration.engine import transformer_blocks
from lowbit.calibration.importance import calibration_batches
from lowbit.layers import quantize_model
from lowbit.methods.awq import best_scales, output_error, scale_groups
from lowbit.methods.calibrated import calibrate_methods
from lowbit.planning import QuantConfig, QuantPlan
from lowbit.planning.sensitivity import measure_sensitivity


def tiny_llama(kv_heads: int):
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=kv_heads, max_position_embeddings=256)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def batches(vocab=300, n=2):
    return [torch.randint(0, vocab, (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(n)]


def plan(label):
    return QuantPlan.uniform(QuantConfig.parse(label))


def awq_scale(model, plan, data) -> dict:
    """AWQ's pass: ``{layer: s}`` where it folded scales into the model."""
    calibrate_methods(model, plan, data, progress=False)
    return {name: s for name, s in model.lowbit_awq.items() if s is not None}


@pytest.mark.parametrize("kv_heads", [4, 2])  # with grouped-query attention v_proj -> o_proj cannot be folded
def test_the_fold_leaves_the_full_precision_model_as_it_was(kv_heads):
    model, data = tiny_llama(kv_heads), batches()
    with torch.inference_mode():
        before = [model(b).logits for b in data]
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    scales = awq_scale(model, plan("int4/32+awq"), data)
    with torch.inference_mode():
        after = [model(b).logits for b in data]
    for x, y in zip(before, after, strict=True):
        torch.testing.assert_close(y, x, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)
    folded = {"q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj", *(["o_proj"] if kv_heads == 4 else [])}
    assert {n.rsplit(".", 1)[1] for n in scales} == folded
    unfolded = {n for n, s in model.lowbit_awq.items() if s is None}  # recorded, so quantize_model goes on
    assert unfolded == ({f"model.layers.{i}.self_attn.o_proj" for i in range(2)} if kv_heads == 2 else set())
    assert model.lowbit_awq.keys() == scales.keys() | unfolded


def test_the_chosen_scales_never_give_more_output_error_than_none():
    model = tiny_llama(4)
    config = QuantConfig.parse("int3/32")
    block = transformer_blocks(model)[0]
    group = scale_groups(block)[0]  # input_layernorm -> q, k, v
    x = torch.randn(256, 64) * torch.linspace(0.1, 4.0, 64)  # uneven channels: what AWQ is for
    h = 2 * x.T @ x / 256
    members = [(f"l{i}", m, config) for i, m in enumerate(group.layers)]
    s = best_scales(members, h, x.abs().mean(0))
    errors = [sum(output_error(n, m.weight.detach(), c, t, h) for n, m, c in members) for t in (s, torch.ones(64))]
    assert errors[0] < errors[1]


def test_on_smollm2_the_scales_cut_a_groups_output_error(smollm2):
    model, tokenizer, info = smollm2[:3]
    group = scale_groups(model.model.layers[3])[0]
    captured = []
    handle = group.layers[0].register_forward_pre_hook(
        lambda m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        for batch in calibration_batches(tokenizer, info.kind, scored=16, count=2)[0]:
            model(batch)
    handle.remove()
    x = torch.cat(captured)
    h = 2 * x.T @ x / x.shape[0]
    members = [(f"l{i}", m, QuantConfig.parse("int4/64")) for i, m in enumerate(group.layers)]
    s = best_scales(members, h, x.abs().mean(0))
    with_s, without = (sum(output_error(n, m.weight.detach(), c, t, h) for n, m, c in members)
                       for t in (s, torch.ones(x.shape[1])))
    assert with_s < 0.9 * without


def test_bert_folds_only_value_into_the_attention_output():
    """Post-norm: a LayerNorm's output is also the residual, so only value -> attention.output.dense folds."""
    config = BertConfig(vocab_size=200, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=128, max_position_embeddings=64)
    torch.manual_seed(0)
    model = BertModel(config).eval()
    data = batches(200)
    with torch.inference_mode():
        before = [model(b).last_hidden_state for b in data]
    scales = awq_scale(model, plan("int4/32+awq"), data)
    assert sorted(scales) == ["encoder.layer.0.attention.output.dense", "encoder.layer.1.attention.output.dense"]
    with torch.inference_mode():
        for b, x in zip(data, before, strict=True):
            torch.testing.assert_close(model(b).last_hidden_state, x, rtol=1e-4, atol=1e-4)


def test_refusals():
    model = tiny_llama(4)
    with pytest.raises(ValueError, match=r"\+awq, whose scales come from the whole model's calibration pass: run "
                                         r"lowbit\.workflows\.run\.run"):
        quantize_model(model, QuantPlan.uniform("int4/32+awq"), progress=False)
    with pytest.raises(ValueError, match=r"int4\+awq: \+awq changes the model .* cannot be one layer's candidate"):
        measure_sensitivity(model, ["int4", "int4+awq"], batches(), progress=False)
    mlp = nn.Sequential(nn.ModuleList([nn.Sequential(nn.Linear(8, 8)) for _ in range(2)]))
    with pytest.raises(ValueError, match="knows pre-norm Llama-style blocks and BERT blocks, not Sequential"):
        scale_groups(transformer_blocks(mlp)[0])
    assert QuantConfig.parse("nf4/32+gptq+awq+dq").label == "nf4/32+dq+awq+gptq"
