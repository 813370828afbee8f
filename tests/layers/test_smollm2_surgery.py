"""quantize_model on the embedded SmolLM2-135M: generate() works, memory shrinks, modes agree."""

from __future__ import annotations

import copy

import pytest
import torch

import lowbit
from lowbit import QuantConfig, QuantLinear, dispatch, quantize_model
from lowbit.errors import LayerQuantizeError
from lowbit.layers.surgery import check_plan
from lowbit.planning import QuantPlan

# SmolLM2-135M: 30 decoder layers x (q, k, v, o, gate, up, down); lm_head is excluded
N_LINEAR = 30 * 7
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def nf4_model(smollm2):
    model = copy.deepcopy(smollm2[0])
    report = quantize_model(model, QuantPlan.uniform(QuantConfig("nf4")), progress=False)
    return model, report


def test_nf4_replaces_every_decoder_linear(nf4_model, smollm2):
    model, report = nf4_model
    assert len(report.layers) == N_LINEAR and "lm_head" not in report.layers
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == N_LINEAR
    # the tied embedding / output head is untouched and still shared
    assert model.lm_head.weight is model.model.embed_tokens.weight
    print(
        f"nf4: layers {report.layer_bytes_before:,} -> {report.layer_bytes_after:,} bytes, "
        f"model {report.model_bytes_before:,} -> {report.model_bytes_after:,} bytes, {report.seconds:.2f} s"
    )
    assert report.model_bytes_before - report.model_bytes_after == report.layer_bytes_before - report.layer_bytes_after


def test_generate_runs_on_the_quantized_model(nf4_model, smollm2):
    model, _ = nf4_model
    tokenizer = smollm2[1]
    ids = tokenizer(PROMPT, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, ids["input_ids"].shape[1] + 4)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1] :])


def test_materialized_logits_are_bitwise_equal_to_packed(nf4_model, smollm2):
    """The reference packed path decodes as materialize() does; the fused kernel (the
    default on CPU) sums the same decoded weights in another order: float32 rounding apart."""
    model, _ = nf4_model
    ids = smollm2[1](PROMPT, return_tensors="pt")
    with torch.no_grad():
        fused = model(**ids).logits
        with dispatch.use("reference"):
            packed = model(**ids).logits
        layers = [m.materialize() for m in model.modules() if isinstance(m, QuantLinear)]
        try:
            cached = model(**ids).logits
        finally:
            for m in layers:
                m.release()
    assert torch.equal(packed, cached)
    assert (fused - packed).abs().max() < 1e-3 * packed.abs().max()
    assert torch.equal(fused.argmax(-1), packed.argmax(-1))


@pytest.mark.parametrize("fmt", ["nf4", "int4", "q4_0"])
def test_four_bit_layers_hold_at_most_30_percent_of_fp32(fmt, smollm2, nf4_model):
    if fmt == "nf4":
        report = nf4_model[1]
    else:
        model = copy.deepcopy(smollm2[0])
        report = quantize_model(model, QuantPlan.uniform(QuantConfig(fmt)), progress=False)
        del model
    assert report.layer_bytes_after <= 0.30 * report.layer_bytes_before
    assert report.model_bytes_after < report.model_bytes_before


def _error_for(smollm2, config):
    model = smollm2[0]  # quantize_model checks every layer before swapping any: safe to share
    with pytest.raises(LayerQuantizeError) as err:
        quantize_model(model, QuantPlan.uniform(config), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    return str(err.value)


def test_q4_k_names_the_first_576_wide_layer(smollm2):
    # q4_k super-blocks hold 256 weights (ggml QK_K); 576 = 2.25 x 256 is not whole
    msg = _error_for(smollm2, QuantConfig("q4_k"))
    assert "model.layers.0.self_attn.q_proj" in msg and "576" in msg
    with pytest.raises(LayerQuantizeError) as err:  # the same verdict without quantizing anything
        check_plan(smollm2[0], QuantPlan.uniform("q4_k"))
    assert str(err.value) == msg
    check_plan(smollm2[0], QuantPlan.uniform("q4_0"))


def test_row_block_rule_names_the_layer(smollm2):
    import dataclasses

    rows = dataclasses.replace(lowbit.get_format("int4"), row_blocks=True)  # always available, unlike q4_k
    msg = _error_for(smollm2, QuantConfig(rows, block_size=256))
    assert "model.layers.0.self_attn.q_proj" in msg and "576" in msg
