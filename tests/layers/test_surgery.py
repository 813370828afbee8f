"""quantize_model on small hand-built models: selection, atomicity, byte accounting."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import nn

from lowbit import QuantConfig, QuantLinear, dispatch, get_format, quantize_model
from lowbit.errors import LayerQuantizeError
from lowbit.evaluate import materialize
from lowbit.layers import model_weight_bytes
from lowbit.layers.surgery import reference_weight_bytes
from lowbit.planning import QuantPlan


class Block(nn.Module):
    def __init__(self, width=64):
        super().__init__()
        self.q_proj = nn.Linear(width, width, bias=False)
        self.up = nn.Linear(width, 2 * width)
        self.down = nn.Linear(2 * width, width)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(self.q_proj(x))))


class Toy(nn.Module):
    def __init__(self, width=64, vocab=50):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        self.layers = nn.ModuleList([Block(width) for _ in range(2)])
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, like SmolLM2

    def forward(self, ids):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(x)


def _replaced(model):
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))


def test_default_replaces_every_linear_but_lm_head():
    model = Toy()
    report = quantize_model(model, QuantPlan.uniform(QuantConfig("nf4")), progress=False)
    assert _replaced(model) == sorted(report.layers)
    assert len(report.layers) == 6 and "lm_head" not in report.layers
    assert isinstance(model.lm_head, nn.Linear) and isinstance(model.embed, nn.Embedding)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, 50)


def test_report_counts_bytes_exactly():
    model = Toy()
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    before_model = model_weight_bytes(model)
    report = quantize_model(model, QuantPlan.uniform("nf4"), progress=False)
    assert report.format == "nf4"
    assert report.layer_bytes_before == sum(w.numel() * 4 for w in weights)
    qs = [m.qweight for m in model.modules() if isinstance(m, QuantLinear)]
    assert report.layer_bytes_after == sum(q.nbytes for q in qs)
    assert report.model_bytes_before == before_model
    # the replaced fp32 weights are gone, the packed ones are held instead
    assert report.model_bytes_after == before_model - report.layer_bytes_before + report.layer_bytes_after
    assert report.seconds > 0 and report.layer_ratio < 0.3


def test_tied_weights_are_counted_once():
    model = Toy()
    params = sum(p.numel() * 4 for p in model.parameters())  # parameters() already dedupes tied ones
    assert model_weight_bytes(model) == params
    assert model.lm_head.weight.data_ptr() == model.embed.weight.data_ptr()


def test_include_and_exclude_patterns():
    model = Toy()
    plan = QuantPlan.uniform("int4", include=("q_proj", "layers.1.*"), exclude=("*.down",))
    report = quantize_model(model, plan, progress=False)
    assert sorted(report.layers) == ["layers.0.q_proj", "layers.1.q_proj", "layers.1.up"]
    assert QuantPlan.uniform("int4", include="up").include == ("up",)  # a bare string is one pattern


def test_excluding_nothing_quantizes_the_tied_head_and_keeps_the_embedding():
    model = Toy()
    report = quantize_model(model, QuantPlan.uniform(QuantConfig("nf4"), exclude=()), progress=False)
    assert "lm_head" in report.layers and isinstance(model.embed, nn.Embedding)
    assert report.model_bytes_after > report.model_bytes_before - report.layer_bytes_before  # embedding stays


def test_materialized_model_gives_bitwise_equal_output():
    ids = torch.tensor([[4, 8, 15, 16]])
    packed, cached = Toy(), Toy()
    quantize_model(packed, QuantPlan.uniform("nf4"), progress=False)
    report = quantize_model(cached, QuantPlan.uniform("nf4"), progress=False)
    materialize(cached)
    assert all(m.materialized for m in cached.modules() if isinstance(m, QuantLinear))
    with dispatch.use("reference"):  # the fused kernel matches to float32 rounding, not the bit
        assert torch.equal(packed(ids), cached(ids))
    assert model_weight_bytes(cached) > report.model_bytes_before  # the cached fp32 copies are counted


def test_a_layer_that_cannot_hold_whole_blocks_is_named_and_nothing_changes():
    model = Toy(width=64)
    ref = model(torch.tensor([[1, 2]]))
    rows = dataclasses.replace(get_format("int4"), row_blocks=True)  # a GGUF-like rule on a plain format
    # up (64 -> 128) holds 64-wide rows, down (128 -> 64) holds 128-wide rows: block 128 fits down only
    with pytest.raises(LayerQuantizeError, match=r"layer 'layers\.0\.q_proj' \(weight 64x64\).*whole blocks of 128"):
        quantize_model(model, QuantPlan.uniform(QuantConfig(rows, block_size=128)), progress=False)
    assert not _replaced(model) and torch.equal(model(torch.tensor([[1, 2]])), ref)
    plan = QuantPlan.uniform(QuantConfig(rows, block_size=128), include=("down",))
    report = quantize_model(model, plan, progress=False)
    assert report.layers == ("layers.0.down", "layers.1.down")


def test_bad_configs_fail_before_touching_the_model():
    with pytest.raises(ValueError, match="unknown format"):
        QuantConfig("nf17")
    with pytest.raises(ValueError, match="block_size"):
        QuantConfig("nf4", block_size=0)
    with pytest.raises(ValueError, match=r"double quantization\) does not apply to int4_asym"):
        QuantConfig("int4_asym", double_quant=True)
    with pytest.raises(ValueError, match=r"fixed block of 32 weights \(OCP MX v1\.0\)"):
        QuantConfig("mxfp4", block_size=64)
    model = Toy()
    with pytest.raises(ValueError, match="no nn.Linear layer matched"):
        quantize_model(model, QuantPlan.uniform(QuantConfig("nf4"), include=("nothing_here",)), progress=False)
    assert not _replaced(model)
    with pytest.raises(ValueError, match="model itself"):
        quantize_model(nn.Linear(8, 8), QuantPlan.uniform("nf4"), progress=False)


def test_a_module_reachable_under_two_names_is_replaced_at_both():
    shared = nn.Linear(32, 32)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    report = quantize_model(model, QuantPlan.uniform("nf4"), progress=False)
    assert report.layers == ("0", "2") and model[0] is model[2]
    assert report.layer_bytes_before == 32 * 32 * 4  # one weight, held once


def test_multihead_attention_out_proj_is_left_alone():
    model = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, batch_first=True)
    report = quantize_model(model, QuantPlan.uniform("nf4"), progress=False)
    assert sorted(report.layers) == ["linear1", "linear2"]  # MHA reads out_proj.weight directly
    assert model(torch.randn(1, 3, 32)).shape == (1, 3, 32)


def test_double_quant_layers():
    model = Toy()
    report = quantize_model(model, QuantPlan.uniform(QuantConfig("nf4", double_quant=True)), progress=False)
    plain = quantize_model(Toy(), QuantPlan.uniform("nf4"), progress=False)
    assert report.layer_bytes_after < plain.layer_bytes_after
    assert all(m.qweight.double_quant for m in model.modules() if isinstance(m, QuantLinear))


def tiny_llama(tied: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def fp32_bytes(model) -> int:
    return model_weight_bytes(model)  # a float32 model: its bytes are its reference's


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("head", [True, False])
def test_reference_is_the_original_float32_model(tied, head):
    """Quantizing a tied head stores it twice (a packed head and the float embedding), yet the original, the
    reference, held it once; an untied head is a tensor of its own in both."""
    original = tiny_llama(tied)
    quantized = copy.deepcopy(original)
    plan = QuantPlan.uniform(QuantConfig("q4_0"), exclude=() if head else ("lm_head",))
    quantize_model(quantized, plan, progress=False)
    assert any(isinstance(m, QuantLinear) for m in quantized.modules())
    assert reference_weight_bytes(original) == fp32_bytes(original)
    assert reference_weight_bytes(quantized) == fp32_bytes(original)


def test_a_model_quantized_in_parts_reports_as_one():
    from lowbit.layers.surgery import QuantizeReport, plan_layers

    model, plan = Toy(), QuantPlan.uniform("nf4")
    names = [n[0] for n, _, _, _ in plan_layers(model, plan)]
    sink = lambda *a: None  # noqa: E731
    whole = quantize_model(model, plan, progress=False, sink=sink)
    half = len(names) // 2
    parts = [quantize_model(model, plan, progress=False, sink=sink, only=names[:half]),
             quantize_model(model, plan, progress=False, sink=sink, only=names[half:])]
    assert [p.layers for p in parts] == [tuple(names[:half]), tuple(names[half:])]
    combined = QuantizeReport.combine(parts)
    assert combined.layers == whole.layers and combined.layer_configs == whole.layer_configs
    for field in ("layer_numel", "layer_bytes_before", "layer_bytes_after", "model_bytes_before",
                  "model_bytes_after"):
        assert getattr(combined, field) == getattr(whole, field), field
