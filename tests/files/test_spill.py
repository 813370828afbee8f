"""A shard written from the spill file is byte for byte the file safetensors' own save_file writes for the same
tensors: every dtype lowbit stores, names whose order differs by bytes, empty and 0-d tensors."""

import torch
from safetensors.torch import save_file

from lowbit.files.spill import Spill

DTYPES = (torch.bool, torch.uint8, torch.int8, torch.float8_e5m2, torch.float8_e4m3fn, torch.int16, torch.float16,
          torch.bfloat16, torch.int32, torch.float32, torch.float64, torch.int64)


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        x = torch.randn(3, 5 + i, generator=g) * 50
        out[f"layer.{i % 3}.t{dtype}".replace("torch.", "")] = x.to(dtype) if dtype != torch.bool else x > 0
    out["B.upper"] = torch.arange(7, dtype=torch.int32)  # sorts before lower case as bytes
    out["é.accent"] = torch.zeros(2, dtype=torch.float32)
    out["scalar"] = torch.tensor(1.5)
    out["empty"] = torch.zeros(0, 4, dtype=torch.bfloat16)
    return out


def test_a_spilled_shard_is_the_file_save_file_writes(tmp_path):
    spill = Spill(tmp_path)
    for name, t in reversed(tensors().items()):  # the order added does not matter
        spill.add(name, t)
    spill.write(list(spill.entries), tmp_path / "a.safetensors", {"format": "pt"})
    save_file(tensors(), tmp_path / "b.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    spill.close()
    assert not (tmp_path / ".spill").exists()


def test_what_is_kept_after_a_shard_is_written_next_time_unchanged(tmp_path):
    spill, every = Spill(tmp_path), tensors()
    for name, t in every.items():
        spill.add(name, t)
    names = list(every)
    spill.write(names[:5], tmp_path / "first.safetensors")
    spill.keep(names[5:])
    assert list(spill.entries) == names[5:]
    spill.add("later", torch.ones(3))
    spill.write([*names[5:], "later"], tmp_path / "a.safetensors")
    save_file({**{n: every[n] for n in names[5:]}, "later": torch.ones(3)}, tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    spill.close()
