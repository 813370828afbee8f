"""load_quantized reads a (sharded) output tensor by tensor (issue 27 #5): the same model as the single file gives,
and no tensor read is left beside the model while the next is read."""

from __future__ import annotations

import copy
import gc

import pytest
import torch
from torch import nn

from lowbit import QuantLinear, load_model, quantize_model
from lowbit.files.shards import INDEX
from lowbit.io import load_quantized, save_quantized
from lowbit.io.streamed import quantize_to_directory
from lowbit.layers.keep_dtype import NarrowEmbedding
from lowbit.models.lazy import Checkpoint, load_lazily
from lowbit.models.synthetic import PRESETS, write_checkpoint
from lowbit.planning import QuantPlan

LABEL = "nf4/32+dq"
IDS = torch.arange(100, 164)[None]


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
    """A bf16 Llama with an untied head (8B's layout, tiny), quantized in memory and saved to one file with its
    unquantized tensors kept in bf16, and streamed to shards the same way: ``(model, whole, sharded)``."""
    root = tmp_path_factory.mktemp("lazy")
    source = write_checkpoint(root / "tiny", PRESETS["tiny"])
    model, tokenizer, info = load_model(source)
    plan = QuantPlan.uniform(LABEL)
    report = quantize_model(model, plan, progress=False)
    whole = save_quantized(model, tokenizer, info, report, plan, root / "whole", keep_dtype=torch.bfloat16)
    lazy, tokenizer, info, weights = load_lazily(source)
    quantize_to_directory(lazy, weights, tokenizer, info, plan, root / "sharded", keep_dtype=torch.bfloat16,
                          shard_bytes=1 << 20, progress=False)
    return model, whole, root / "sharded"


def test_a_sharded_output_loads_to_the_single_files_logits(untied):
    model, whole, sharded = untied
    assert (sharded / INDEX).is_file() and len(list(sharded.glob("model-*.safetensors"))) >= 3
    (one, _, _), (shards, _, _) = load_quantized(whole), load_quantized(sharded)
    with torch.inference_mode():
        expected = model(IDS).logits  # the model in memory, its unquantized tensors rounded through bf16 by the save
        assert torch.equal(one(IDS).logits, expected) and torch.equal(shards(IDS).logits, expected)
    assert one.lm_head.weight is not one.model.embed_tokens.weight  # untied stays untied


def test_an_untied_embedding_stays_as_stored_and_computes_the_same(untied):
    """The bf16 embedding table is kept bf16 (half the memory of float32), its rows float32; the head, norms and
    the rest are float32 as the model computes. The lean decode loop gives the in-memory model's logits too."""
    from lowbit import dispatch
    from lowbit.generation import LlamaStepper

    model, whole, _ = untied
    loaded, _, _ = load_quantized(whole)
    embed = loaded.model.embed_tokens
    assert isinstance(embed, NarrowEmbedding) and embed.weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in loaded.named_parameters() if n != "model.embed_tokens.weight"} == {torch.float32}
    assert torch.equal(embed.weight.float(), model.model.embed_tokens.weight)
    with torch.inference_mode():
        assert embed(IDS).dtype == torch.float32
        assert copy.deepcopy(loaded).half().model.embed_tokens(IDS).dtype == torch.float16  # a cast model's rows too
    with dispatch.use("reference"):  # the PyTorch loop for both (the native step takes float32 tables only)
        steps = [LlamaStepper(m, IDS.shape[1] + 2) for m in (model, loaded)]
        for ids in (IDS[0], IDS[0, :1], IDS[0, 1:2]):
            expected, got = (step(ids) for step in steps)
            assert torch.equal(got, expected)


def _storages(tensors) -> dict[int, int]:
    """Storage address -> bytes of the CPU tensors among ``tensors`` (views of one storage count once)."""
    found = {}
    for t in tensors:
        if issubclass(type(t), torch.Tensor) and t.device.type == "cpu":
            storage = t.untyped_storage()
            try:
                found[storage.data_ptr()] = storage.nbytes()
            except RuntimeError:  # a tensor with no data (a FakeTensor an earlier test's torch.compile left)
                continue
    return found


def loose_bytes() -> int:
    """Bytes of the live CPU tensors that no module holds (as a parameter, buffer, packed part or sign)."""
    objects = gc.get_objects()
    held: set[int] = set()
    for m in objects:
        if issubclass(type(m), nn.Module):  # type(): isinstance asks some objects for __class__, which warns
            mine = [*m.parameters(recurse=False), *m.buffers(recurse=False)]
            if isinstance(m, QuantLinear):
                mine += [*m.qweight.parts.values(), m.signs]
            held |= _storages(mine).keys()
    return sum(n for ptr, n in _storages(objects).items() if ptr not in held)


def test_no_tensor_read_waits_beside_the_model(untied, monkeypatch):
    """Each time load_quantized reads a tensor, every tensor it read before is in the model or gone: at most
    the parts of the one layer being built are loose. Reading every tensor first (a dict of the file) fails here:
    the embedding (3 MB in bf16) is loose when the head is read. The shards: a single file is read the same way."""
    _, _, directory = untied
    read, peaks = Checkpoint.read, []

    def watched(self, name):
        peaks.append((loose_bytes() - before, name))
        return read(self, name)

    monkeypatch.setattr(Checkpoint, "read", watched)
    gc.collect()
    before = loose_bytes()
    model, _, meta = load_quantized(directory)
    after = loose_bytes() - before
    checkpoint = Checkpoint(directory)
    assert len(peaks) == len(checkpoint.where)  # each stored tensor read once
    largest_layer = max(sum(p.nbytes for p in m.qweight.parts.values()) for m in model.modules()
                        if isinstance(m, QuantLinear))
    peak, name = max(peaks)
    assert peak <= largest_layer, f"{peak} bytes loose when {name} was read"
    assert after <= 0  # nothing left behind
