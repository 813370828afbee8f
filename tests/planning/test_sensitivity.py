"""Sensitivity: each layer's KL measured with the earlier blocks replayed equals a plain forward with that layer
alone quantized; a model read from its checkpoint one block at a time gives the same table, to the bit; the proxy
scales the anchor's KL by output error; on the embedded model it ranks as KL does."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lowbit
from lowbit import load_model
from lowbit.models.lazy import load_lazily
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
    """Mean KL over every token, full forwards of the whole model with ``name``'s weight replaced; each batch's KL
    summed in float64 and the sums added in batch order, as the measurement adds them."""
    linear = model.get_submodule(name)
    with torch.inference_mode():
        ref = [model(b, use_cache=False).logits.float().log_softmax(-1) for b in batches]
        saved, linear.weight.data = linear.weight.data, weight
        try:
            out = [model(b, use_cache=False).logits.float().log_softmax(-1) for b in batches]
        finally:
            linear.weight.data = saved
    kl = [(p.exp() * (p - q)).sum(-1) for p, q in zip(ref, out, strict=True)]
    return sum(float(k.double().sum()) for k in kl) / sum(k.numel() for k in kl), saved


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
            assert cost.kl == expected  # a block run on its caught inputs computes what it does in a full forward
        assert s.costs[name]["int3"].kl > s.costs[name]["int8"].kl


def in_memory(model):
    """The indices of ``model``'s blocks with a parameter off the meta device."""
    return [i for i, b in enumerate(model.model.layers) if any(not p.is_meta for p in b.parameters())]


def test_a_model_read_block_by_block_gives_the_table_of_the_model_in_memory(tiny_lm_dir):
    """Bit for bit, the tied head too (measured on inputs caught anew: its weight is the embedding's), with one
    block in memory whenever one runs and every tensor read put back after."""
    model, _, _ = load_model(tiny_lm_dir)
    lazy, _, _, weights = load_lazily(tiny_lm_dir)
    assert weights is not None and lazy.lm_head.weight is lazy.model.embed_tokens.weight
    batches = [torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(i))
               for i in range(2)]
    kwargs = {"measure": "all", "exclude": (), "progress": False}
    whole = measure_sensitivity(model, ["int3", "q4_0", "int8"], batches, **kwargs)
    seen = []
    hooks = [b.register_forward_hook(lambda m, a, out, i=i: seen.append((i, in_memory(lazy))))
             for i, b in enumerate(lazy.model.layers)]
    try:
        read = measure_sensitivity(lazy, ["int3", "q4_0", "int8"], batches, weights=weights, **kwargs)
    finally:
        for h in hooks:
            h.remove()
    assert list(read.costs) == list(whole.costs) and "lm_head" in read.costs and len(read.costs) == 2 * 7 + 1
    assert read.costs == whole.costs and read.anchor == whole.anchor and read.numel == whole.numel
    assert seen and all(found == [i] for i, found in seen)
    assert all(p.is_meta for p in lazy.parameters()) and lazy.lm_head.weight is lazy.model.embed_tokens.weight


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


@pytest.mark.slow  # 2 blocks and the head, 2 candidates each, measured twice on 2 windows of 64 tokens: ~1 minute
def test_smollm2_read_block_by_block_gives_the_table_of_the_model_in_memory(smollm2):
    from lowbit.calibration.importance import calibration_batches

    model, tokenizer, info, _ = smollm2
    lazy, _, _, weights = load_lazily(None)
    assert weights is not None, "the embedded SmolLM2's converted safetensors are cached after its first load"
    batches, _ = calibration_batches(tokenizer, info.kind, None, window=64, scored=16, count=2)
    kwargs = {"measure": "all", "exclude": (), "progress": False,
              "include": ("model.layers.0.*", "model.layers.29.*", "lm_head")}
    whole = measure_sensitivity(model, ["q4_0", "int8"], batches, **kwargs)
    read = measure_sensitivity(lazy, ["q4_0", "int8"], batches, weights=weights, **kwargs)
    assert len(whole.costs) == 2 * 7 + 1 and read.costs == whole.costs and read.anchor == whole.anchor
