"""The Hadamard rotation: fwht equals the Sylvester matrix (scipy), rotate/unrotate are inverse, y = W x kept."""

import pytest
import torch
from scipy.linalg import hadamard

from lowbit.layers.rotation import fwht, hadamard_block, layer_signs, rotate, rotate_hessian, unrotate
from lowbit.planning import QuantConfig, QuantPlan


@pytest.mark.parametrize(("n", "block"), [(576, 64), (1536, 512), (96, 32), (8, 8)])
def test_hadamard_block_and_fwht_equal_the_block_diagonal_sylvester_matrix(n, block):
    assert hadamard_block(n) == block
    x = torch.randn(3, n, dtype=torch.float64)
    H = torch.block_diag(*[torch.from_numpy(hadamard(block)).double()] * (n // block)) / block ** 0.5
    assert torch.allclose(fwht(x, block), x @ H.T, atol=1e-12)


def test_rotation_keeps_the_layer_output_and_the_hessian_is_rotated_with_it():
    n = 96
    signs, block = layer_signs("model.layers.0.mlp.up_proj", n), hadamard_block(n)
    assert signs.dtype == torch.int8 and set(signs.tolist()) == {-1, 1}
    assert torch.equal(signs, layer_signs("model.layers.0.mlp.up_proj", n))  # the same layer, the same signs
    assert not torch.equal(signs, layer_signs("model.layers.1.mlp.up_proj", n))
    W, X = torch.randn(10, n, dtype=torch.float64), torch.randn(50, n, dtype=torch.float64)
    Wr, Xr = rotate(W, signs, block), rotate(X, signs, block)
    assert torch.allclose(X @ W.T, Xr @ Wr.T, atol=1e-10)
    assert torch.allclose(unrotate(Wr, signs, block), W, atol=1e-12)
    assert torch.allclose(rotate_hessian(X.T @ X, signs, block), Xr.T @ Xr, atol=1e-9)


def test_an_odd_dimension_cannot_be_rotated():
    with pytest.raises(ValueError, match="even input dimension"):
        hadamard_block(75)


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
    from lowbit.methods.gptq_model import gptq_weights

    model, ids = tiny
    q = copy.deepcopy(model)
    config = QuantConfig.parse(label)
    pre = None
    if config.method:
        found = gptq_weights(model, QuantPlan.uniform(config), [ids[:1], ids[1:]], progress=False)
        pre = {n: r.qweight for n, r in found.items()}
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
