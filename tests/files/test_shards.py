"""Tensors written shard by shard: one shard is save_tensors' own file; more are transformers' layout."""

import json

import torch
from safetensors.torch import load_file

from lowbit.files.atomic import save_tensors
from lowbit.files.shards import INDEX, SINGLE, ShardWriter


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"layer.{i}.{kind}": torch.randn(64, 16, generator=g).to(dtype)
            for i in range(5) for kind, dtype in (("weight", torch.bfloat16), ("codes", torch.float32))}


def test_one_shard_is_the_file_save_tensors_writes(tmp_path):
    (tmp_path / "a").mkdir()
    writer = ShardWriter(tmp_path / "a")
    for name, t in reversed(tensors().items()):  # the order added does not matter
        writer.add(name, t)
    assert writer.close() == [SINGLE]
    save_tensors(tensors(), tmp_path / "b.safetensors")
    assert (tmp_path / "a" / SINGLE).read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_shards_hold_every_tensor_once_with_transformers_index(tmp_path):
    writer = ShardWriter(tmp_path, max_bytes=3 * 64 * 16 * 4)  # a bfloat16 and a float32 tensor, twice, a shard
    for name, t in tensors().items():
        writer.add(name, t)
    files = writer.close()
    shards = [f"model-{i:05d}-of-00003.safetensors" for i in range(1, 4)]
    assert files == [*shards, INDEX] and sorted(p.name for p in tmp_path.iterdir()) == sorted(files)
    index = json.loads((tmp_path / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors().values())
    found = {}
    for shard in shards:
        held = load_file(tmp_path / shard)
        assert all(index["weight_map"][name] == shard for name in held)
        found.update(held)
    assert found.keys() == tensors().keys() == index["weight_map"].keys()
    assert all(torch.equal(found[k], t) and found[k].dtype == t.dtype for k, t in tensors().items())
