"""Finding 9 of issue 25: the reference row counts the same tensors as the quantized row.

`lowbit eval` of an imported model printed "32.000 bits/weight, 113.4 MB" for SmolLM2's reference (only the
tensors the import did not quantize: the quantized ones were on the meta device when it counted) against a 189.0 MB
quantized row. The reference is now the float32 size of the loaded model's tensors, each quantized layer at its
dequantized size, as `compare` measures it on the same model.
"""

import copy
import json

import pytest
import torch

from lowbit.layers.linear import QuantLinear
from lowbit.layers.surgery import model_weight_bytes, quantize_model, reference_weight_bytes
from lowbit.planning import QuantPlan
from lowbit.planning.config import QuantConfig
from tests.commands.test_model_cmds import run_main


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


def test_eval_of_an_imported_model_reports_the_reference_compare_reports(tiny_lm_dir, tmp_path, capsys):
    """quantize -> export --to bnb -> import -> eval: the reference is the tiny model's 12.9 MB, as compare says,
    not the 12.6 MB of its embedding and norms that the import used to record as model_bytes_before (it now
    records the reference too)."""
    from lowbit import load_model

    original = fp32_bytes(load_model(str(tiny_lm_dir))[0])
    for args in (("quantize", "--model", tiny_lm_dir, "--format", "nf4", "-o", tmp_path / "q"),
                 ("export", tmp_path / "q", "--to", "bnb", "-o", tmp_path / "bnb"),
                 ("import", tmp_path / "bnb", "-o", tmp_path / "imported"),
                 ("eval", tmp_path / "imported", "--windows", "1", "--window", "32", "--json", tmp_path / "e.json")):
        r = run_main(capsys, *args)
        assert r.returncode == 0, r.stderr
    stored = json.loads((tmp_path / "imported" / "lowbit.json").read_text())["quantize"]["model_bytes_before"]
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["reference"]["weight_bytes"] == original == stored
    assert report["results"][0]["weight_bytes"] < original
    assert f"{original / 1e6:.1f}" in r.stdout
