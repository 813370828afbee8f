"""Sensitivity: each layer's KL measured with the earlier blocks replayed equals a plain forward with that layer
alone quantized; the proxy scales the anchor's KL by output error; on the embedded model it ranks as KL does."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit.planning.sensitivity import Sensitivity, measure_sensitivity


@pytest.fixture(scope="module")
def tiny():
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    batches = [torch.randint(0, 300, (1, 48), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return model, batches


def plain_kl(model, batches, name, weight):
    """Mean KL over every token, the whole model run with ``name``'s weight replaced."""
    linear = model.get_submodule(name)
    with torch.inference_mode():
        ref = [model(b, use_cache=False).logits.float().log_softmax(-1) for b in batches]
        saved, linear.weight.data = linear.weight.data, weight
        try:
            out = [model(b, use_cache=False).logits.float().log_softmax(-1) for b in batches]
        finally:
            linear.weight.data = saved
    kl = torch.cat([(p.exp() * (p - q)).sum(-1).flatten() for p, q in zip(ref, out, strict=True)])
    return kl.double().mean().item(), saved


def test_measured_kl_equals_a_plain_forward_with_one_layer_quantized(tiny):
    model, batches = tiny
    before = {k: v.clone() for k, v in model.state_dict().items()}
    s = measure_sensitivity(model, ["int3", "nf4", "int8"], batches, measure="all", progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # left as it was
    assert len(s.numel) == 3 * 7 and "lm_head" not in s.numel
    for name in ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.2.self_attn.o_proj"]:
        weight = model.get_submodule(name).weight
        for label in ["int3", "nf4"]:
            q = lowbit.quantize(weight.detach(), label)
            expected, _ = plain_kl(model, batches, name, q.dequantize().view(weight.shape))
            cost = s.costs[name][label]
            assert cost.measured and cost.bytes == q.nbytes
            assert cost.kl == pytest.approx(expected, rel=1e-4, abs=1e-9)
        assert s.costs[name]["int3"].kl > s.costs[name]["int8"].kl


def test_error_is_the_mean_squared_output_change_on_the_layers_inputs(tiny):
    model, batches = tiny
    name = "model.layers.1.mlp.down_proj"
    linear = model.get_submodule(name)
    seen = []
    handle = linear.register_forward_pre_hook(lambda m, a: seen.append(a[0].reshape(-1, a[0].shape[-1])))
    with torch.inference_mode():
        for b in batches:
            model(b, use_cache=False)
    handle.remove()
    x = torch.cat(seen).double()
    dw = (lowbit.quantize(linear.weight.detach(), "int3").dequantize().view(linear.weight.shape)
          - linear.weight.detach()).double()
    s = measure_sensitivity(model, ["int3", "int8"], batches, progress=False)
    assert s.costs[name]["int3"].error == pytest.approx(((x @ dw.T) ** 2).sum(1).mean().item(), rel=1e-9)


def test_the_proxy_scales_the_anchors_measured_kl_by_output_error(tiny):
    model, batches = tiny
    s = measure_sensitivity(model, ["int3", "int4", "int8"], batches, progress=False)
    assert s.anchor == "int4"  # the lower median of the candidates' stored bytes
    for layer in s.costs.values():
        anchor = layer["int4"]
        assert anchor.measured and not layer["int3"].measured and not layer["int8"].measured
        assert layer["int3"].kl == pytest.approx(anchor.kl * layer["int3"].error / anchor.error, rel=1e-12)
    named = measure_sensitivity(model, ["int3", "int4"], batches, anchor="int3", progress=False)
    assert all(layer["int3"].measured for layer in named.costs.values())


def test_a_table_is_saved_and_read_back_exactly(tiny, tmp_path):
    model, batches = tiny
    s = measure_sensitivity(model, ["int3", "int8"], batches, progress=False)
    s.save(tmp_path / "s.json")
    assert Sensitivity.load(tmp_path / "s.json") == s
    (tmp_path / "bad.json").write_text('{"layers": 3}')
    with pytest.raises(ValueError, match="bad.json: not a lowbit sensitivity table"):
        Sensitivity.load(tmp_path / "bad.json")


def test_bad_arguments_are_one_line_errors(tiny):
    model, batches = tiny
    with pytest.raises(ValueError, match="anchor 'nf4' is not one of the candidates"):
        measure_sensitivity(model, ["int3", "int8"], batches, anchor="nf4", progress=False)
    with pytest.raises(ValueError, match="measure must be one of anchor, all"):
        measure_sensitivity(model, ["int3"], batches, measure="some", progress=False)
    with pytest.raises(ValueError, match="no calibration inputs"):
        measure_sensitivity(model, ["int3"], [], progress=False)


@pytest.mark.slow  # 42 layers x 3 candidates measured on one 512-token window: ~3 minutes
def test_the_proxy_ranks_layers_as_the_measured_kl_does_on_the_embedded_model(smollm2):
    """Spearman >= 0.8 between the predicted KL (the nf4 anchor's measured KL times the output-error ratio) and
    the KL measured for int3 and int6, over the layers of six blocks spread through the model."""
    from scipy.stats import spearmanr

    from lowbit.calibration.importance import calibration_batches

    model, tokenizer, info = smollm2
    batches, _ = calibration_batches(tokenizer, info.kind, None, scored=16, count=1)
    include = tuple(f"model.layers.{i}.*" for i in (0, 5, 11, 17, 23, 29))
    s = measure_sensitivity(model, ["int3", "nf4", "int6"], batches, measure="all", include=include, progress=False)
    assert len(s.numel) == 42 and s.anchor == "nf4"
    for label in ("int3", "int6"):
        predicted = [s.costs[n]["nf4"].kl * s.costs[n][label].error / s.costs[n]["nf4"].error for n in s.numel]
        measured = [s.costs[n][label].kl for n in s.numel]
        assert spearmanr(predicted, measured).statistic >= 0.8, label
