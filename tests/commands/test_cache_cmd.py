"""`lowbit cache` / `lowbit cache clear`: listing from headers only, clearing by age, one-line errors."""

import json
import os
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from lowbit.cli import main
from lowbit.commands import cache_cmd
from lowbit.eval.protocol import Protocol
from lowbit.eval.reference import Reference, causal_reference
from lowbit.models.hashing import RECORDS


class TinyLM(nn.Module):
    def __init__(self, vocab=200):
        super().__init__()
        self.embed, self.head = nn.Embedding(vocab, 8), nn.Linear(8, vocab)

    def forward(self, ids):
        return SimpleNamespace(logits=self.head(self.embed(ids)))


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def add_reference(windows: int, name: str):
    torch.manual_seed(windows)
    ids = torch.randint(0, 200, (windows, 32))
    protocol = Protocol("pydoc_data.topics", "t" * 64, 32, windows, "k" * 64)
    return causal_reference(TinyLM, ids, protocol, f"sha-{windows}", model_name=name, progress=False).path


def add_model(root, name: str, size: int):
    d = root / f"model-{'ab' * 16}"
    d.mkdir(parents=True)
    (d / "model.safetensors").write_bytes(b"\0" * size)
    (d / "lowbit-cache.json").write_text(json.dumps(
        {"kind": "model", "model": name, "source": f"/models/{name}.gguf", "source_sha256": "0" * 64,
         "created": "2025-01-01T00:00:00Z", "files": {"model.safetensors": "0" * 64}}))
    return d


def age(path, seconds):
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_list_shows_references_and_models(root, capsys, monkeypatch):
    small, big = add_reference(2, "tiny-lm"), add_reference(3, "other-lm")
    model = add_model(root, "SmolLM2-135M", 5000)
    age(small, 3 * 86400)
    now = time.time()
    monkeypatch.setattr(cache_cmd.time, "time", lambda: now)  # both listings see the same ages
    assert main(["cache"]) == 0
    out = capsys.readouterr().out
    assert main(["cache", "list"]) == 0 and capsys.readouterr().out == out
    model_size = sum(f.stat().st_size for f in model.iterdir())
    for text in ("tiny-lm", "other-lm", "SmolLM2-135M", "pydoc_data.topics", "32 × 2", "32 × 3", "3d",
                 cache_cmd.human_size(model_size), cache_cmd.human_size(big.stat().st_size)):
        assert text in out, text
    total = small.stat().st_size + big.stat().st_size + model_size
    assert f"3 entries, {cache_cmd.human_size(total)}" in out


def test_list_reads_headers_only(root, capsys, monkeypatch):
    path = add_reference(2, "tiny-lm")
    monkeypatch.setattr("lowbit.eval.cache.CacheFile", None)  # opening (and hashing) a file would fail
    assert main(["cache", "list"]) == 0
    assert "tiny-lm" in capsys.readouterr().out and path.exists()


def test_list_of_an_empty_cache(root, capsys):
    assert main(["cache"]) == 0
    assert capsys.readouterr().out.strip() == f"the cache {root} is empty"
    assert not root.exists()  # listing creates nothing


def test_clear_older_than(root, capsys):
    old, new = add_reference(2, "old-lm"), add_reference(3, "new-lm")
    model = add_model(root, "old-model", 1000)
    age(old, 8 * 86400)
    age(model / "lowbit-cache.json", 8 * 86400)
    freed = old.stat().st_size + sum(f.stat().st_size for f in model.iterdir())
    assert main(["cache", "clear", "--older-than", "7d"]) == 0
    assert capsys.readouterr().out.strip() == f"removed 2 entries ({cache_cmd.human_size(freed)}) from {root}"
    assert os.listdir(root) == [new.name]


def test_clear_all_keeps_a_reference_in_use_and_removes_temps(root, capsys):
    path = add_reference(2, "busy-lm")
    add_reference(3, "idle-lm")
    (root / f".{path.name}.xyz.tmp").write_bytes(b"\0" * 300)  # a killed run's
    reader = Reference.open(path)  # another run scoring against it
    (root / RECORDS).mkdir()
    (root / RECORDS / "0123.json").write_text("{}")  # a model file's recorded sha256 (lowbit.models.hashing)
    assert main(["cache", "clear"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("removed 1 entry (") and "1 temp file of killed runs (300 B)" in out
    assert "kept 1 in use" in out and "; 1 recorded file hash" in out and os.listdir(root) == [path.name]
    del reader


@pytest.mark.parametrize("argv, message", [
    (["cache", "clear", "--older-than", "7x"], "--older-than takes a number and a unit"),
    (["cache", "clear", "--older-than", "soon"], "--older-than takes a number and a unit"),
])
def test_bad_duration_is_one_line(root, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_cache_that_is_a_file(tmp_path, monkeypatch, capsys):
    (tmp_path / "f").write_text("")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "f"))
    assert main(["cache"]) == 2
    assert capsys.readouterr().err == f"lowbit cache: error: LOWBIT_CACHE is not a directory: {tmp_path / 'f'}\n"


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("30m", 1800), ("12h", 43200), ("7d", 604800),
                                           ("2w", 1209600), ("1.5h", 5400)])
def test_parse_duration(text, seconds):
    assert cache_cmd.parse_duration(text) == seconds
