"""A model read layer by layer (lowbit.models.lazy), rounded in memory or streamed to its files
(io.streamed.quantize_to_directory), is saved to the same bytes as one loaded whole."""

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lowbit.errors import ModelLoadError
from lowbit.files.shards import INDEX
from lowbit.io.model_io import save_quantized
from lowbit.io.streamed import quantize_to_directory
from lowbit.models.lazy import Checkpoint, load_lazily
from lowbit.models.loader import load_model
from lowbit.planning import QuantPlan
from lowbit.workflows.run import run


def saved(tmp_path, name, model, tokenizer, info, plan, source=None) -> dict:
    """``{file: bytes}`` of the saved quantized model, lowbit.json without its timing."""
    report = run(model, plan, progress=False, source=source)
    return read_back(save_quantized(model, tokenizer, info, report, plan, tmp_path / name))


def read_back(directory) -> dict:
    """``{file: bytes}`` of a saved quantized model, lowbit.json without its timing."""
    files = {p.name: p.read_bytes() for p in Path(directory).iterdir()}
    meta = json.loads(files.pop("lowbit.json"))
    meta["quantize"].pop("seconds")
    return files | {"lowbit.json": meta}


def both_ways(tmp_path, spec, plan) -> tuple[dict, dict]:
    """What saving ``plan`` gives from ``load_model(spec)`` and from ``load_lazily(spec)``, read in then rounded
    in memory (``run(source=)``) and streamed to the files (``quantize_to_directory``); the last two are the
    same. (A GGUF file's first load, which converts it, keeps transformers' GGUF quantization_config in its
    config; the loads after it, from the converted cache, do not: all are compared from the cache, as a second
    `lowbit quantize` reads it.)"""
    model, tokenizer, info = load_model(spec)
    lazy_model, lazy_tokenizer, lazy_info, weights = load_lazily(spec)
    assert weights is not None and lazy_info == info
    assert all(p.is_meta for p in lazy_model.parameters())  # nothing read before the plan says what
    quantize_to_directory(lazy_model, weights, lazy_tokenizer, lazy_info, plan, tmp_path / "streamed", progress=False)
    assert all(p.is_meta for p in lazy_model.parameters())  # streaming changes nothing of the model
    lazy = saved(tmp_path, "lazy", lazy_model, lazy_tokenizer, lazy_info, plan, source=weights)
    assert read_back(tmp_path / "streamed") == lazy
    return saved(tmp_path, "whole", model, tokenizer, info, plan), lazy


@pytest.mark.parametrize("plan", [QuantPlan.uniform("nf4"), QuantPlan.uniform("int4_asym/64@hqq"),
                                  QuantPlan.uniform("int8_outlier"),
                                  QuantPlan.uniform("q4_0", exclude=())],  # the tied head quantized too
                         ids=lambda p: p.label)
def test_smollm2_read_layer_by_layer_saves_the_same_bytes(smollm2, tmp_path, plan):
    whole, lazy = both_ways(tmp_path, None, plan)  # smollm2: its GGUF converted once for the session
    assert whole.keys() == lazy.keys() and all(whole[k] == lazy[k] for k in whole), \
        [k for k in whole if whole[k] != lazy[k]]


def test_minilm_read_layer_by_layer_saves_the_same_bytes(tmp_path):
    whole, lazy = both_ways(tmp_path, "minilm", QuantPlan.uniform("nf4/32+dq"))
    assert whole == lazy


@pytest.fixture
def sharded(tmp_path, tiny_lm_dir):
    """A tiny Llama saved in bf16 as three or more shards with transformers' index, and its tokenizer."""
    config = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    directory = tmp_path / "sharded"
    model.save_pretrained(directory, max_shard_size="40KB")
    for f in tiny_lm_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            (directory / f.name).write_bytes(f.read_bytes())
    assert len(list(directory.glob("model-*.safetensors"))) >= 3 and (directory / INDEX).is_file()
    return directory


def test_a_sharded_checkpoint_is_read_tensor_by_tensor(tmp_path, sharded):
    whole, lazy = both_ways(tmp_path, str(sharded), QuantPlan.uniform("int4/32"))
    assert whole == lazy


def test_bad_checkpoints_are_refused(sharded):
    index = json.loads((sharded / INDEX).read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (sharded / first).rename(sharded / "moved.safetensors")
    with pytest.raises(ModelLoadError, match=f"lists shard {first}, which .* does not hold"):
        Checkpoint(sharded)
    (sharded / "moved.safetensors").rename(sharded / first)
    name = next(k for k, f in index["weight_map"].items() if f != first)
    (sharded / INDEX).write_text(json.dumps({**index, "weight_map": {**index["weight_map"], name: first}}))
    with pytest.raises(ModelLoadError, match=f"names tensor {name} in {first}, which does not hold it"):
        Checkpoint(sharded)
    (sharded / INDEX).write_text(json.dumps(index))
    config = json.loads((sharded / "config.json").read_text())
    (sharded / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ModelLoadError, match=r"gate_proj.weight in model-.* has shape \[128, 64\]; the "
                                             r"architecture config.json describes has \[96, 64\] \(and 5 more"):
        load_lazily(str(sharded))  # before anything is read
    (sharded / "config.json").write_text(json.dumps({**config, "dtype": "float16", "torch_dtype": "float16"}))
    with pytest.raises(ModelLoadError, match=r"tensor .* in model-.* is BF16; config.json's dtype says "
                                             r"float16 \(F16\)"):
        load_lazily(str(sharded))  # a shard from another export: transformers would cast it silently
    (sharded / "config.json").write_text(json.dumps(config))
    data = (sharded / first).read_bytes()
    (sharded / first).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="its tensors span .* the file holds"):
        Checkpoint(sharded)


def test_a_block_is_read_in_and_put_back_in_place(sharded):
    model, _, _, weights = load_lazily(sharded)
    block = model.model.layers[1]
    linear = block.self_attn.q_proj
    weights.onload(model, under="model.layers.1")
    assert model.model.layers[1] is block and block.self_attn.q_proj is linear  # identities kept
    assert all(not p.is_meta for p in block.parameters())
    assert all(p.is_meta for p in model.model.layers[0].parameters())  # nothing else read
    full = load_model(str(sharded))[0]
    assert torch.equal(linear.weight, full.model.layers[1].self_attn.q_proj.weight)
    weights.offload(model, "model.layers.1")
    assert all(p.is_meta for p in block.parameters()) and block.self_attn.q_proj is linear
