"""``+had`` on a model: each layer's weight rotated before rounding computes what its effective weight does, with
+gptq too, and a rotated model saves and loads to the bit (the rotation's math: tests/layers/test_rotation.py)."""

import pytest
import torch

from lowbit.layers.rotation import layer_signs
from lowbit.planning import QuantConfig, QuantPlan


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), torch.randint(0, 300, (2, 24))


def effective_copy(model):
    """The model with every QuantLinear replaced by an nn.Linear holding its effective weight."""
    import copy

    from lowbit.layers import QuantLinear

    out = copy.deepcopy(model)
    for name, m in list(out.named_modules()):
        if isinstance(m, QuantLinear):
            linear = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            linear.weight.data = m.effective_weight()
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, linear)
    return out


@pytest.mark.parametrize("label", ["nf4/32+had", "int3+dq+had", "nf4/32+dq+had+gptq@amse"])
def test_a_rotated_model_computes_with_its_effective_weights(tiny, label):
    import copy

    from lowbit.layers import QuantLinear, quantize_model
    from lowbit.methods.calibrated import calibrate_methods

    model, ids = tiny
    q = copy.deepcopy(model)
    config = QuantConfig.parse(label)
    pre = None
    if config.prequantized:
        pre = calibrate_methods(model, QuantPlan.uniform(config), [ids[:1], ids[1:]], progress=False).prequantized
    report = quantize_model(q, QuantPlan.uniform(config), prequantized=pre, progress=False)
    layers = [m for m in q.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14 and all(m.signs is not None for m in layers)
    assert report.layer_bytes_after == sum(m.qweight.nbytes + m.in_features for m in layers)  # signs counted
    with torch.inference_mode():
        got, want, original = q(ids).logits, effective_copy(q)(ids).logits, model(ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    assert (got - original).abs().mean() < 0.5 * original.abs().mean()  # a quantized model, not noise


def test_a_rotated_model_is_saved_and_loaded_exactly(tiny_lm_dir, tmp_path):
    from lowbit.io.model_io import load_quantized, save_quantized
    from lowbit.layers import QuantLinear, quantize_model
    from lowbit.models import load_model

    model, tokenizer, info = load_model(str(tiny_lm_dir))
    report = quantize_model(model, QuantPlan.uniform("nf4/32+had"), progress=False)
    save_quantized(model, tokenizer, info, report, QuantPlan.uniform("nf4/32+had"), tmp_path / "m")
    loaded, _, meta = load_quantized(tmp_path / "m")
    assert all(layer["rotation"] == "hadamard" for layer in meta["layers"].values())
    ids = torch.randint(0, 1000, (1, 16))
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
    signs = {n: m.signs for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    assert all(torch.equal(s, layer_signs(n, s.numel())) for n, s in signs.items())
