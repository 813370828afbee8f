"""KL / perplexity / top-1 on the embedded SmolLM2 against the cached reference (SPEC.md §9)."""

import copy

import bitsandbytes.functional as F
import pytest
import torch

from lowbit import QuantConfig, quantize_model
from lowbit.eval import causal_reference, read_text, score_causal, token_windows
from lowbit.evaluate import materialize

WINDOWS = 2


@pytest.fixture(scope="module")
def setup(smollm2):
    model, tokenizer, info, _ = smollm2
    name, text = read_text(None)
    ids, protocol = token_windows(tokenizer, text, name, windows=WINDOWS)
    ref = causal_reference(lambda: model, ids, protocol, info.file_hash, progress=False)
    return model, ids, protocol, info, ref


def float64_kl(ref_model, model, ids) -> torch.Tensor:
    """Per-token KL(p_ref || p) straight from the definition, in float64, no cache."""
    out = []
    with torch.inference_mode():
        for window in ids:
            lp = ref_model(window[None]).logits[0, :-1].double().log_softmax(-1)
            lq = model(window[None]).logits[0, :-1].double().log_softmax(-1)
            out.append((lp.exp() * (lp - lq)).sum(-1))
    return torch.cat(out)


def test_reference_is_cached_and_not_recomputed(setup):
    model, ids, protocol, info, ref = setup

    def must_not_load():
        raise AssertionError("the reference model was loaded although the reference is cached")

    again = causal_reference(must_not_load, ids, protocol, info.file_hash, progress=False)
    assert again.path == ref.path and torch.equal(again.nll, ref.nll) and torch.equal(again.top1, ref.top1)


def test_damaged_cache_is_recomputed(setup, tmp_path, monkeypatch):
    model, ids, protocol, info, ref = setup
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    first = causal_reference(lambda: model, ids[:1], protocol, "damaged", progress=False)
    first.path.write_bytes(b"not safetensors")
    again = causal_reference(lambda: model, ids[:1], protocol, "damaged", progress=False)
    assert torch.equal(again.nll, first.nll)


def test_unwritable_cache_fails_before_the_model_runs(setup, tmp_path, monkeypatch):
    _, ids, protocol, _, _ = setup
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "file" / "cache"))

    def must_not_load():
        raise AssertionError("the model ran although its result could not be stored")

    with pytest.raises(OSError, match="cannot create the reference cache .*LOWBIT_CACHE"):
        causal_reference(must_not_load, ids[:1], protocol, "unwritable", progress=False)


def test_model_against_its_own_reference(setup):
    model, ids, _, _, ref = setup
    s = score_causal(model, ref, progress=False)
    assert s["tokens"] == WINDOWS * 511
    assert s["top1"] == 1.0 and s["ppl"] == pytest.approx(ref.ppl, rel=1e-6)
    assert 0 <= s["kl_mean"] < 1e-5 and s["kl_max"] < 1e-4  # only the fp16 storage of the reference


@pytest.fixture(scope="module")
def int8_model(smollm2):
    model = copy.deepcopy(smollm2[0])
    quantize_model(model, QuantConfig("int8"), progress=False)
    return model


def test_kl_matches_float64_definition(setup, int8_model):
    model, ids, _, _, ref = setup
    s = score_causal(materialize(copy.deepcopy(int8_model)), ref, progress=False)
    exact = float64_kl(model, int8_model, ids)
    assert s["kl_mean"] == pytest.approx(exact.mean().item(), rel=2e-3)
    assert s["kl_max"] == pytest.approx(exact.max().item(), rel=2e-3)
    assert 1e-4 < s["kl_mean"] < 1e-2  # int8 costs something, not much


def test_materialized_weights_give_the_packed_logits(setup, int8_model):
    _, ids, _, _, _ = setup
    fast = materialize(copy.deepcopy(int8_model))
    with torch.inference_mode():
        assert torch.equal(int8_model(ids[:1]).logits, fast(ids[:1]).logits)


def test_nf4_kl_equals_bitsandbytes_quantized_model(setup):
    """The same model with every selected layer quantized by bitsandbytes.functional.quantize_4bit."""
    model, _, _, _, ref = setup
    ours = copy.deepcopy(model)
    quantize_model(ours, QuantConfig("nf4", block_size=64), progress=False)
    bnb = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in bnb.named_modules():
            if isinstance(module, torch.nn.Linear) and name != "lm_head":
                packed, state = F.quantize_4bit(module.weight.reshape(-1), blocksize=64, quant_type="nf4")
                module.weight.copy_(F.dequantize_4bit(packed, state).reshape(module.weight.shape))
    a = score_causal(materialize(ours), ref, progress=False)
    b = score_causal(bnb, ref, progress=False)
    assert a["kl_mean"] == pytest.approx(b["kl_mean"], rel=0.01)
    assert a["top1"] == pytest.approx(b["top1"], abs=0.01)
    print(f"nf4 KL mean: lowbit {a['kl_mean']:.6f}, bitsandbytes {b['kl_mean']:.6f}")
