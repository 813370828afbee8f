"""The converted-GGUF cache: the same model as the conversion, bit for bit; verified before
use; rebuilt (with a notice) when anything in it is off; never a reason for a load to fail."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from lowbit import load_model
from lowbit.models import converted, loader, resolve
from lowbit.models.converted import META, WEIGHTS, CacheWarning, cache_path
from lowbit.models.hashing import file_sha256

PROMPT = "The capital of France is Paris. def f(x): return x ** 2"


def _logits(model, tokenizer) -> torch.Tensor:
    with torch.no_grad():
        return model(**tokenizer(PROMPT, return_tensors="pt")).logits


@pytest.mark.slow  # 30 s, a second full GGUF conversion
def test_cached_load_is_bitwise_the_conversion(tmp_path, monkeypatch, smollm2):
    """The one GGUF conversion this test pays for (~20 s) is the reference: the session
    fixture may itself have come from a cache written earlier in the session."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    gguf = Path(resolve(None)[1])
    model, tokenizer = loader._convert_gguf(gguf)  # transformers' own conversion, no cache involved
    sha = file_sha256(gguf)
    converted.store(model, tokenizer, source=gguf, sha256=sha, name=gguf.stem)

    def no_conversion(path):
        raise AssertionError("converted again although the cache is valid")

    monkeypatch.setattr(loader, "_convert_gguf", no_conversion)
    start = time.perf_counter()
    cached, cached_tokenizer, info = load_model(None)
    print(f"embedded SmolLM2 loaded from the converted-model cache in {time.perf_counter() - start:.2f} s")
    assert info == smollm2[2] and info.source == "smollm2"
    assert torch.equal(_logits(cached, cached_tokenizer), _logits(model, tokenizer))
    ours, theirs = cached.state_dict(), model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert cached.lm_head.weight is cached.model.embed_tokens.weight and not cached.training
    assert {p.dtype for p in cached.parameters()} == {torch.float32}
    assert cached.generation_config.to_dict() == model.generation_config.to_dict()
    chat = [{"role": "user", "content": "Hi <|im_end|> there"}]
    assert cached_tokenizer(PROMPT)["input_ids"] == tokenizer(PROMPT)["input_ids"]
    assert cached_tokenizer.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)
    assert cached_tokenizer.all_special_tokens == tokenizer.all_special_tokens
    assert len(cached_tokenizer) == len(tokenizer)
    meta = json.loads((cache_path(sha) / META).read_text())
    assert meta["source"] == str(gguf) and meta["source_sha256"] == sha and meta["model"] == gguf.stem
    assert meta["files"][WEIGHTS] == file_sha256(cache_path(sha) / WEIGHTS)


# --- the cache's rules, on a tiny model standing in for the conversion (no 20 s per test) ---


@pytest.fixture
def fake_gguf(tmp_path, monkeypatch, tiny_lm_dir):
    """A .gguf path whose "conversion" is the tiny Llama; ``calls`` counts conversions."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    path.write_bytes(b"stand-in for a GGUF file " + str(tmp_path).encode())  # sha256 keys the cache
    calls = []

    def convert(p):
        calls.append(p)
        model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(tiny_lm_dir)

    monkeypatch.setattr(loader, "_convert_gguf", convert)
    return path, calls


def _directory(path: Path) -> Path:
    return cache_path(file_sha256(path))


def test_first_load_converts_and_caches_later_loads_do_not(fake_gguf, recwarn):
    path, calls = fake_gguf
    first, tokenizer, info = load_model(path)
    assert len(calls) == 1 and info.source == str(path.resolve()) and info.file_hash == file_sha256(path)
    directory = _directory(path)
    assert directory.name == f"model-{info.file_hash[:32]}"
    meta = json.loads((directory / META).read_text())
    assert meta["kind"] == "model" and meta["model"] == "tiny" and meta["source"] == str(path)
    assert meta["source_sha256"] == info.file_hash and meta["created"]
    on_disk = {p.name for p in directory.iterdir()} - {META}
    assert on_disk >= {WEIGHTS, "config.json", "tokenizer.json"} and set(meta["files"]) == on_disk
    assert all(meta["files"][n] == file_sha256(directory / n) for n in on_disk)
    os.utime(directory / META, (1, 1))
    second, _, again = load_model(path)
    assert len(calls) == 1 and again == info
    assert (directory / META).stat().st_mtime > 1  # marked used, for `lowbit cache clear --older-than`
    assert torch.equal(_logits(second, tokenizer), _logits(first, tokenizer))
    assert not [w for w in recwarn if issubclass(w.category, CacheWarning)]


def _flip_a_weight_byte(d: Path):
    with open(d / WEIGHTS, "r+b") as f:
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 0x40]))


def _edit_meta(**changes):
    def edit(d: Path):
        meta = json.loads((d / META).read_text())
        (d / META).write_text(json.dumps(meta | changes))
    return edit


def _break_config_but_keep_the_record(d: Path):
    """Verification passes (the record is updated too) but transformers cannot load it."""
    (d / "config.json").write_text('{"model_type": "no-such-architecture"}')
    meta = json.loads((d / META).read_text())
    meta["files"]["config.json"] = file_sha256(d / "config.json")
    meta["sizes"]["config.json"] = (d / "config.json").stat().st_size
    (d / META).write_text(json.dumps(meta))


CORRUPTIONS = {
    "flipped weight byte": (_flip_a_weight_byte, "sha256 differs"),
    "truncated weights": (lambda d: Path(d / WEIGHTS).write_bytes((d / WEIGHTS).read_bytes()[:1000]), "bytes, "),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "does not match"),
    "extra file": (lambda d: (d / "pytorch_model.bin").write_bytes(b"x"), "does not match"),
    "garbage record": (lambda d: (d / META).write_text("{not json"), "no readable"),
    "no record": (lambda d: (d / META).unlink(), "no readable"),
    "record not a dict": (lambda d: (d / META).write_text("[]"), "malformed"),
    "other transformers": (_edit_meta(transformers="0.0.1"), "converted by transformers 0.0.1"),
    "other source": (_edit_meta(source_sha256="0" * 64), "made from another file"),
    "unloadable": (_break_config_but_keep_the_record, "does not load"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_damaged_cache_is_rebuilt_with_one_notice(fake_gguf, corruption):
    path, calls = fake_gguf
    reference, tokenizer, _ = load_model(path)
    damage, reason = CORRUPTIONS[corruption]
    damage(_directory(path))
    with pytest.warns(CacheWarning, match=reason) as notices:
        model, _, _ = load_model(path)
    assert len(notices) == 1 and "\n" not in str(notices[0].message)
    assert len(calls) == 2  # converted again, not trusted
    assert torch.equal(_logits(model, tokenizer), _logits(reference, tokenizer))
    assert converted.lookup(file_sha256(path)) == _directory(path)  # and rewritten whole


def test_an_unwritable_cache_does_not_fail_the_load(fake_gguf, tmp_path, monkeypatch):
    path, calls = fake_gguf
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "a-file" / "cache"))  # cannot be created
    with pytest.warns(CacheWarning, match=r"^cannot cache the converted model in .*a-file.*next run converts") as w:
        _, _, info = load_model(path)
    assert len(w) == 1 and info.file_hash == file_sha256(path) and len(calls) == 1


def test_a_full_disk_is_a_notice_and_leaves_nothing(fake_gguf, monkeypatch, tmp_path):
    path, _ = fake_gguf
    monkeypatch.setattr(shutil, "disk_usage", lambda p: SimpleNamespace(total=1 << 40, used=1 << 40, free=1 << 20))
    with pytest.warns(CacheWarning, match="MiB free"):
        load_model(path)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_failed_write_leaves_no_partial_directory(fake_gguf, monkeypatch, tmp_path):
    path, _ = fake_gguf

    def fail(directory, model, tokenizer, tensors):
        (directory / WEIGHTS).write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(converted, "_write", fail)
    with pytest.warns(CacheWarning, match="No space left on device"):
        load_model(path)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_conversion_without_a_terminal_prints_progress(fake_gguf, monkeypatch):
    """Issue 25, finding 23: the first run without a terminal showed one line for a 30 s conversion.
    Now: a line as it starts, one every few seconds, one with its time at the end (to the real stderr,
    which commands.common.load does not hold)."""
    import io
    import time

    from lowbit.models import converted

    path, _ = fake_gguf
    log = io.StringIO()  # no terminal
    monkeypatch.setattr("sys.__stderr__", log)
    monkeypatch.setattr(converted, "_EVERY", 0.05)
    slow = loader._convert_gguf
    monkeypatch.setattr(loader, "_convert_gguf", lambda p: (time.sleep(0.3), slow(p))[1])
    load_model(path)
    lines = log.getvalue().splitlines()
    assert lines[0] == "lowbit: converting tiny.gguf to float32 (the first load only; later ones read the cache) ..."
    writing = lines.index("lowbit: writing the converted-model cache ...")
    assert lines[1].endswith(" s so far") and lines[writing - 1].startswith("lowbit: converting tiny.gguf")
    assert " done in " in lines[writing - 1]
    assert lines[-1].startswith("lowbit: writing the converted-model cache: done in ")
    log.truncate(0)
    load_model(path)  # from the cache: nothing to announce
    assert log.getvalue() == ""


def test_later_loads_read_no_file_for_its_hash(fake_gguf, monkeypatch):
    """The GGUF file and the cache's files are read once for their sha256 (the cache's on the first load
    that uses it: store hashed them in a temp directory), then recorded: a load costs a stat per file."""
    from lowbit.models import hashing

    monkeypatch.setattr(hashing, "_SETTLED_NS", 0)  # the files are milliseconds old; the rule wants seconds
    path, calls = fake_gguf
    reads = []
    real = hashing._read
    monkeypatch.setattr(hashing, "_read", lambda f: (reads.append(Path(f.name).name), real(f))[1])
    load_model(path)  # hashes the GGUF file, and store its files in the temp directory (nothing recorded)
    on_disk = sorted(p.name for p in _directory(path).iterdir() if p.name != META)
    assert reads[0] == "tiny.gguf" and sorted(reads[1:]) == on_disk
    reads.clear()
    load_model(path)  # the cache's files under their own names, once
    assert sorted(reads) == on_disk
    reads.clear()
    _, _, info = load_model(path)
    assert reads == [] and len(calls) == 1 and info.file_hash == file_sha256(path)


def test_verify_reads_what_the_records_vouch_for(fake_gguf, monkeypatch):
    """A weight damaged where no stat sees it (a failing disk), stood in for by a record that vouches for
    the old bytes: trusted without ``verify``, found with it."""
    from lowbit.models import hashing

    monkeypatch.setattr(hashing, "_SETTLED_NS", 0)
    path, calls = fake_gguf
    load_model(path)
    directory = _directory(path)
    recorded = file_sha256(directory / WEIGHTS)
    _flip_a_weight_byte(directory)
    with monkeypatch.context() as m:
        m.setattr(hashing, "_read", lambda f: recorded)
        file_sha256(directory / WEIGHTS)  # the record now holds the old hash for the damaged file
    assert converted.lookup(file_sha256(path)) == directory
    with pytest.warns(CacheWarning, match="has a changed model.safetensors") as notices:
        _, _, info = load_model(path, verify=True)
    assert len(notices) == 1 and len(calls) == 2 and info.file_hash == file_sha256(path)
    assert file_sha256(directory / WEIGHTS) == json.loads((directory / META).read_text())["files"][WEIGHTS]
