"""Tensors written shard by shard: one shard is save_tensors' own file; more are transformers' layout; shards end
where the producer allows, and a writer stopped midway goes on from its last finished shard."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from lowbit.errors import InputError
from lowbit.files.atomic import save_tensors
from lowbit.files.partial import Partial, ProducerState
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


def groups() -> list[dict[str, torch.Tensor]]:
    """What a block-by-block producer makes: a few tensors a block, a shard allowed to end only after a block."""
    g = torch.Generator().manual_seed(1)
    return [{f"block.{b}.{i}": torch.randn(32, 16, generator=g) for i in range(3)} for b in range(6)]


def produce(writer: ShardWriter, start: int = 0) -> None:
    """The blocks from ``start``, a boundary after each with the state a resumed producer needs: the next block,
    and a tensor it carries (a calibration's hidden states)."""
    for b, block in enumerate(groups()[start:], start=start):
        for name, t in block.items():
            writer.add(name, t)
        writer.boundary(ProducerState({"hidden": torch.full((4,), float(b))}, {"next": b + 1}))


def test_a_shard_ends_only_where_the_producer_allows(tmp_path):
    writer = ShardWriter(tmp_path, max_bytes=4 * 32 * 16 * 4, boundaries=True)  # 4 tensors; a block is 3
    produce(writer)
    files = writer.close()
    index = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    assert len(files) == 7  # 6 blocks, one a shard (a second would not fit), and the index
    for block in groups():
        assert len({index[name] for name in block}) == 1  # never split


def test_a_writer_resumes_from_its_last_finished_shard_to_the_same_bytes(tmp_path):
    (tmp_path / "whole").mkdir()
    limit = 7 * 32 * 16 * 4  # two blocks a shard
    writer = ShardWriter(tmp_path / "whole", max_bytes=limit, boundaries=True)
    produce(writer)
    files = writer.close()

    settings = {"--shard-size": limit}
    (tmp_path / "out").mkdir()
    with Partial.open(tmp_path / "res", settings, resume=False, overwrite=False) as partial:
        writer = ShardWriter(tmp_path / "out", max_bytes=limit, partial=partial, boundaries=True)
        for block in groups()[:5]:  # stopped after 5 blocks: two shards finished, the fifth block held
            for name, t in block.items():
                writer.add(name, t)
            writer.boundary(ProducerState({"hidden": torch.zeros(4)}, {"next": 0}))  # replaced below
        del writer
    shutil.rmtree(tmp_path / "out")  # the killed run's temp output (its spill file with it)
    partial = Partial.open(tmp_path / "res", settings, resume=True, overwrite=False)
    (tmp_path / "out").mkdir()
    writer = ShardWriter(tmp_path / "out", max_bytes=limit, partial=partial, boundaries=True)
    assert len(partial.shards) == 2 and sorted(writer.finished) == sorted(n for b in groups()[:4] for n in b)
    assert writer.resumed.info == {"next": 0}  # what the producer said at the end of the second shard
    produce(writer, start=4)
    assert writer.close() == files
    for name in files:
        assert (tmp_path / "out" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    partial.remove()
    assert not (tmp_path / "res.partial").exists()


def test_the_state_comes_back_with_its_tensors(tmp_path):
    limit = 4 * 32 * 16 * 4
    with Partial.open(tmp_path / "o", {}, resume=False, overwrite=False) as partial:
        writer = ShardWriter(tmp_path, max_bytes=limit, partial=partial, boundaries=True)
        produce(writer)  # each block a shard: the last finished holds block 4, and the state after it
    partial = Partial.open(tmp_path / "o", {}, resume=True, overwrite=False)
    state = ShardWriter(tmp_path, max_bytes=limit, partial=partial, boundaries=True).resumed
    assert state.info == {"next": 5} and torch.equal(state.tensors["hidden"], torch.full((4,), 4.0))
    assert sorted(p.name for p in (tmp_path / "o.partial").glob("state-*")) == ["state-00005.safetensors"]
    partial.close()


def test_a_tensor_made_again_must_match_the_finished_one(tmp_path):
    with Partial.open(tmp_path / "o", {}, resume=False, overwrite=False) as partial:
        writer = ShardWriter(tmp_path, max_bytes=1, partial=partial)  # a shard a tensor
        writer.add("a", torch.ones(3))
        writer.add("b", torch.ones(3))
    partial = Partial.open(tmp_path / "o", {}, resume=True, overwrite=False)
    writer = ShardWriter(tmp_path, max_bytes=1, partial=partial)
    writer.add("a", torch.ones(3))  # the same: skipped
    with pytest.raises(InputError, match="a made now differs from what .*shard-00001.safetensors holds"):
        writer.add("a", torch.full((3,), 2.0))
    partial.close()
