"""quantize_model on the embedded SmolLM2-135M: generate() works, memory shrinks, modes agree."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit import QuantConfig, QuantLinear, dispatch, quantize_model

# SmolLM2-135M: 30 decoder layers x (q, k, v, o, gate, up, down); lm_head is excluded
N_LINEAR = 30 * 7
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def nf4_model(smollm2):
    model = copy.deepcopy(smollm2[0])
    report = quantize_model(model, QuantConfig("nf4"), progress=False)
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
