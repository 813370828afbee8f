"""transformers' save_pretrained refuses a lowbit-quantized model instead of silently dropping its layers."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit import QuantLinear, quantize_model
from lowbit.errors import LowbitError
from lowbit.layers import SavePretrainedError
from lowbit.planning import QuantPlan

REFUSED = r"lowbit QuantLinear layers, which transformers' save_pretrained cannot save.*lowbit\.io\.save_quantized"


def tiny_llama() -> LlamaForCausalLM:
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def quantized_llama():
    model = tiny_llama()
    report = quantize_model(model, QuantPlan.uniform("nf4"), progress=False)
    assert len(report.layers) == 14
    return model


def test_save_pretrained_raises_and_writes_nothing(quantized_llama, tmp_path):
    with pytest.raises(SavePretrainedError, match=REFUSED) as raised:
        quantized_llama.save_pretrained(tmp_path / "out")
    assert isinstance(raised.value, LowbitError) and isinstance(raised.value, ValueError)
    assert list(tmp_path.iterdir()) == []  # not even the directory, let alone a weights file


def test_an_inner_transformers_model_refuses_too(quantized_llama, tmp_path):
    with pytest.raises(SavePretrainedError, match=REFUSED):
        quantized_llama.model.save_pretrained(tmp_path / "inner")
    assert list(tmp_path.iterdir()) == []


def test_state_dict_and_forward_are_untouched(quantized_llama):
    # lowbit.io.save_quantized reads state_dict(): the refusal must not reach it
    keys = set(quantized_llama.state_dict())
    assert "model.embed_tokens.weight" in keys and "model.norm.weight" in keys
    assert not any(k.endswith("q_proj.weight") for k in keys)  # QuantLinear keeps its parts apart
    ids = torch.arange(10)[None]
    with torch.inference_mode():
        assert quantized_llama(ids).logits.shape == (1, 10, 128)


def test_pickled_model_still_refuses(quantized_llama, tmp_path):
    # the quantizer's class is built lazily; pickle must still find it by name (torch.save(model))
    again = pickle.loads(pickle.dumps(quantized_llama))
    ids = torch.arange(10)[None]
    with torch.inference_mode():
        assert torch.equal(again(ids).logits, quantized_llama(ids).logits)
    with pytest.raises(SavePretrainedError, match=REFUSED):
        again.save_pretrained(tmp_path / "out")


def test_a_model_lowbit_did_not_quantize_saves_as_before(tmp_path):
    model = tiny_llama()
    assert getattr(model, "hf_quantizer", None) is None
    model.save_pretrained(tmp_path / "plain")
    assert (tmp_path / "plain" / "model.safetensors").is_file()
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
