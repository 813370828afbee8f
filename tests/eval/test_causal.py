"""KL / perplexity / top-1 on the embedded SmolLM2 against the cached reference (README.md#evaluation-protocol)."""

import copy

import bitsandbytes.functional as F
import pytest
import torch

from lowbit import QuantConfig, dispatch, quantize_model
from lowbit.eval import score_causal
from lowbit.evaluate import materialize
from lowbit.planning import QuantPlan

from .helpers import SMOLLM2_WINDOWS


def float64_kl(ref_model, model, ids) -> torch.Tensor:
    """Per-token KL(p_ref || p) straight from the definition, in float64, no cache."""
    out = []
    with torch.inference_mode():
        for window in ids:
            lp = ref_model(window[None]).logits[0, :-1].double().log_softmax(-1)
            lq = model(window[None]).logits[0, :-1].double().log_softmax(-1)
            out.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(out)


def test_model_against_its_own_reference(setup):
    model, ids, _, _, ref = setup
    s = score_causal(model, ref, progress=False)
    assert s["tokens"] == SMOLLM2_WINDOWS * 511
    assert s["top1"] == 1.0 and s["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
    assert 0 <= s["kl_mean"] < 1e-5 and s["kl_max"] < 1e-4  # only the fp16 storage of the reference


@pytest.fixture(scope="module")
def int8_model(smollm2):
    model = copy.deepcopy(smollm2[0])
    quantize_model(model, QuantPlan.uniform(QuantConfig("int8")), progress=False)
    return model


def test_kl_matches_float64_definition(setup, int8_model):
    model, ids, _, _, ref = setup
    s = score_causal(materialize(copy.deepcopy(int8_model)), ref, progress=False)
    exact = float64_kl(model, int8_model, ids)
    assert s["kl_mean"] == pytest.approx(exact.mean().item(), rel=2e-3)
    assert s["kl_max"] == pytest.approx(exact.max().item(), rel=2e-3)
    assert 1e-4 < s["kl_mean"] < 1e-2  # int8 costs something, not much


def test_materialized_weights_give_the_packed_logits(setup, int8_model):
    """Materialized equals the packed reference path (decode, then F.linear) to the bit; the fused
    kernel sums in its own order (QuantLinear's docstring), so it matches to float32 rounding only:
    on some CPUs its sums equal torch's bit for bit, on others they differ in the last digit."""
    _, ids, _, _, _ = setup
    fast = materialize(copy.deepcopy(int8_model))
    with torch.inference_mode():
        with dispatch.use("reference"):
            packed = int8_model(ids[:1]).logits
        assert torch.equal(packed, fast(ids[:1]).logits)
        torch.testing.assert_close(int8_model(ids[:1]).logits, packed, rtol=1e-4, atol=1e-4)


def _with_weights_from(model, roundtrip):
    """A copy of ``model`` whose selected layers (every Linear but lm_head) hold ``roundtrip(weight)``."""
    peer = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in peer.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                module.weight.copy_(roundtrip(module.weight))
    return peer


def _bnb_nf4(w):
    packed, state = F.quantize_4bit(w.reshape(-1), blocksize=64, quant_type="nf4")
    return F.dequantize_4bit(packed, state).reshape(w.shape)


def _gguf_q4_0(w):
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    data = quantize(w.numpy(), GGMLQuantizationType.Q4_0)
    return torch.from_numpy(dequantize(data, GGMLQuantizationType.Q4_0)).reshape(w.shape)


@pytest.mark.parametrize("label, roundtrip", [("nf4/64", _bnb_nf4), ("q4_0", _gguf_q4_0)], ids=["bnb-nf4", "gguf-q4_0"])
def test_kl_equals_the_reference_library_quantized_model(setup, label, roundtrip):
    """lowbit's model against the same model whose layers went through bitsandbytes'
    quantize_4bit / gguf-py's Q4_0 quantizer: KL within 1% (the weights are bitwise equal)."""
    model, _, _, _, ref = setup
    ours = copy.deepcopy(model)
    quantize_model(ours, QuantPlan.uniform(QuantConfig.parse(label)), progress=False)
    a = score_causal(materialize(ours), ref, progress=False)
    b = score_causal(_with_weights_from(model, roundtrip), ref, progress=False)
    assert a["kl_mean"] == pytest.approx(b["kl_mean"], rel=0.01)
    assert a["top1"] == pytest.approx(b["top1"], abs=0.01)
    print(f"{label} KL mean: lowbit {a['kl_mean']:.6f}, reference library {b['kl_mean']:.6f}")
