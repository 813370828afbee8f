"""The block-by-block run of a causal LM gives the log-probabilities of full forwards to the bit: on SmolLM2 as
loaded, quantized (dequantized one block at a time) and read from its checkpoint one block at a time; a model
without blocks runs whole; what a Resident brings in is put back after."""

import copy

import pytest
import torch

from lowbit import QuantConfig, quantize_model
from lowbit.eval.blockwise import Dequantized, Onloaded, block_names, next_token_logprobs, window_logprobs
from lowbit.evaluate import materialize
from lowbit.layers.linear import QuantLinear
from lowbit.models.lazy import load_lazily
from lowbit.planning import QuantPlan


def full_forwards(model, ids) -> list[torch.Tensor]:
    """Each window's log-probabilities from a forward of the whole model (how compare and eval ran before)."""
    return [next_token_logprobs(model, window) for window in ids]


def walked(model, ids) -> list[torch.Tensor]:
    found = {}
    window_logprobs(model, ids, found.__setitem__, label="test", progress=False)
    assert list(found) == list(range(len(ids)))
    return list(found.values())


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_smollm2_block_by_block_equals_full_forwards(setup):
    model, ids, *_ = setup
    assert block_names(model) == [f"model.layers.{i}" for i in range(30)]
    assert_bitwise(walked(model, ids), full_forwards(model, ids))


def test_smollm2_quantized_dequantized_per_block_equals_materialized_full_forwards(setup):
    model, ids, *_ = setup
    quantized = copy.deepcopy(model)
    quantize_model(quantized, QuantPlan.uniform(QuantConfig.parse("q4_0"), exclude=()), progress=False)
    layers = [m for m in quantized.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 30 * 7 + 1  # the tied head too: dequantized outside the blocks
    found = walked(Dequantized(quantized), ids[:1])
    assert not any(m.materialized for m in layers)  # each block's dequantized weights dropped after it ran
    assert_bitwise(found, full_forwards(materialize(quantized), ids[:1]))
    assert_bitwise(walked(Dequantized(quantized), ids[:1]), found)  # materialized before: left so, same floats
    assert all(m.materialized for m in layers)


def test_smollm2_read_block_by_block_equals_the_loaded_model(setup):
    model, ids, *_ = setup
    lazy, _, _, weights = load_lazily(None)
    assert weights is not None, "the embedded SmolLM2's converted safetensors are cached after its first load"
    assert_bitwise(walked(Onloaded(lazy, weights), ids[:1]), full_forwards(model, ids[:1]))
    assert all(p.is_meta for p in lazy.parameters())  # everything read was put back, the tied head with the rest
    assert lazy.lm_head.weight is lazy.model.embed_tokens.weight


def test_a_model_without_blocks_runs_whole(lm):
    model, ids, _ = lm
    assert block_names(model) == []
    assert_bitwise(walked(model, ids), full_forwards(model, ids))
    assert_bitwise(walked(Dequantized(model), ids), full_forwards(model, ids))


def test_a_failing_window_puts_back_what_was_read(setup):
    _, ids, *_ = setup
    lazy, _, _, weights = load_lazily(None)

    def fail(i, logprobs):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        window_logprobs(Onloaded(lazy, weights), ids[:1], fail, label="test", progress=False)
    assert all(p.is_meta for p in lazy.parameters())
    assert type(lazy.model.layers[0]).__name__ == "LlamaDecoderLayer"  # the replayed blocks are back

