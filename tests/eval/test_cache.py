"""The reference cache: checksums, damaged files, free space, full disks, temp files of killed runs."""

import errno
import gc
import logging
import math
import os
import time

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from lowbit import cachedir
from lowbit.eval import cache
from lowbit.eval.cache import CacheFile, CacheIntegrityError, CacheSpaceError
from lowbit.eval.causal import score_causal
from lowbit.eval.reference import Reference

from .helpers import Loads, never, overwrite, reference


@pytest.mark.parametrize("per_row", [False, True], ids=["one-sha256-per-tensor", "one-sha256-per-row"])
@pytest.mark.parametrize("tensor", ["logprobs", "lse", "nll", "top1", "ids"])
def test_same_size_corruption_is_detected_and_recomputed(lm, root, caplog, monkeypatch, tensor, per_row):
    if per_row:
        monkeypatch.setattr(cache, "ROW_HASH_BYTES", 0)
    fresh = score_causal(lm[0], reference(lm), progress=False)
    path = reference(lm, never).path
    size = path.stat().st_size
    overwrite(path, tensor)
    assert path.stat().st_size == size
    loads = Loads(lm[0])
    with caplog.at_level(logging.WARNING, logger="lowbit.eval.cache"):
        again = reference(lm, loads)
    assert loads.calls == 1
    [record] = caplog.records
    assert "damaged" in record.getMessage() and "sha256" in record.getMessage() and "\n" not in record.getMessage()
    assert score_causal(lm[0], again, progress=False) == fresh


def test_the_corruption_would_give_nan_kl_if_trusted(lm, root):
    path = reference(lm).path
    overwrite(path, "logprobs")  # 0xffff: an fp16 NaN
    trusted = Reference.open(path, verify=False)
    assert math.isnan(score_causal(lm[0], trusted, progress=False)["kl_mean"])
    with pytest.raises(CacheIntegrityError, match="logprobs fails its sha256 check"):
        Reference.open(path)


def _truncate(path):
    os.truncate(path, path.stat().st_size - 100)


def _garbage(path):
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")


def _no_checksums(path):
    f = CacheFile(path)
    save_file({k: f.tensor(k) for k in ("ids", "logprobs", "nll", "top1", "lse")}, path, metadata={"window": "16"})


def _other_tokens(path):
    f = CacheFile(path)
    tensors = {k: f.tensor(k) for k in ("ids", "logprobs", "nll", "top1", "lse")}
    tensors["ids"] = tensors["ids"].flip(0).contiguous()
    del f
    cache.write_entry(path, tensors, {"kind": "ref-causal"})  # checksums fine, contents for other tokens


@pytest.mark.parametrize("damage", [_truncate, _garbage, _no_checksums, _other_tokens, lambda p: p.write_bytes(b"")],
                         ids=["truncated", "garbage", "no-checksums", "other-tokens", "empty"])
def test_damaged_file_is_recomputed_with_one_notice(lm, root, caplog, damage):
    expected = reference(lm)
    damage(expected.path)
    loads = Loads(lm[0])
    with caplog.at_level(logging.WARNING, logger="lowbit.eval.cache"):
        again = reference(lm, loads)
    assert loads.calls == 1 and len(caplog.records) == 1 and "recomputing" in caplog.records[0].getMessage()
    assert torch.equal(again.lse, expected.lse) and torch.equal(again.ids, lm[1])


def test_lowbit_cache_naming_a_file_fails_before_any_work(lm, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "file"))
    with pytest.raises(NotADirectoryError, match=f"^LOWBIT_CACHE is not a directory: {tmp_path / 'file'}$"):
        reference(lm, never)


def test_unwritable_cache_directory(lm, root, monkeypatch):
    def refuse(**kwargs):
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(cachedir.tempfile, "TemporaryFile", refuse)
    with pytest.raises(PermissionError, match=r"cannot write to the cache directory .* \(Read-only file system\); "
                                              "set LOWBIT_CACHE"):
        reference(lm, never)


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"),
                                     SafetensorError("Error while serializing: I/O error: No space left on device "
                                                     "(os error 28)")], ids=["OSError", "SafetensorError"])
def test_disk_full_while_writing_is_one_line_and_leaves_no_temp_file(lm, root, monkeypatch, failure):
    def half_written(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"\0" * 4096)
        raise failure

    monkeypatch.setattr(cache, "save_file", half_written)
    with pytest.raises(CacheSpaceError) as info:
        reference(lm)
    path = cache.cache_path("ref-causal", model="tiny-sha", protocol=lm[2].to_dict())
    assert str(info.value).startswith(f"No space left on device writing the reference cache {path}; ")
    assert info.value.errno == errno.ENOSPC and "\n" not in str(info.value)
    assert os.listdir(root) == []


def test_other_write_errors_name_the_file(lm, root, monkeypatch):
    def broken(tensors, path, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: Input/output error (os error 5)")

    monkeypatch.setattr(cache, "save_file", broken)
    with pytest.raises(OSError, match=r"^cannot write the reference cache .*\.safetensors \(Input/output error\)$"):
        reference(lm)
    assert os.listdir(root) == []


def _age(path, seconds):
    then = time.time() - seconds
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        os.utime(p, (then, then))


def test_sweep_removes_what_killed_runs_left(lm, root):
    kept_entry = reference(lm).path
    ref_temp = root / f".{kept_entry.name}.a1b2c3.tmp"  # atomic_file's, from a run killed while writing
    st_temp, old_st_temp = root / ".tmpAb12Cd", root / ".tmpXy34Zw"  # safetensors' own temps
    model_temp = root / f".model-{'cd' * 16}.x9.tmp"  # a converted model's atomic_dir
    model_temp.mkdir()
    (model_temp / "model.safetensors").write_bytes(b"x" * 10)
    for f in (ref_temp, st_temp, old_st_temp):
        f.write_bytes(b"x" * 100)
    _age(old_st_temp, 2 * cachedir.STALE_SECONDS)
    removed = {p.name: size for p, size in cachedir.sweep_temps(root)}
    # no write holds the lock: an entry's temps go now; safetensors' (a name not ours alone) once an hour old
    assert removed == {ref_temp.name: 100, model_temp.name: 10, old_st_temp.name: 100}
    assert sorted(os.listdir(root)) == sorted([kept_entry.name, st_temp.name])


def test_sweep_and_clear_touch_only_what_lowbit_wrote(lm, root):
    """LOWBIT_CACHE may name a directory with other files in it (even /tmp)."""
    from lowbit.commands.cache_cmd import clear

    reference(lm)
    foreign = [root / ".bashrc.old", root / "my-model.safetensors", root / ".notes.tmp", root / "model-mine"]
    for f in foreign[:3]:
        f.write_text("mine")
    foreign[3].mkdir()
    (foreign[3] / "notes.txt").write_text("mine")
    for f in foreign:
        _age(f, 2 * cachedir.STALE_SECONDS)
    assert cachedir.sweep_temps(root) == []
    assert clear(root).startswith("removed 1 entry")
    assert sorted(os.listdir(root)) == sorted(f.name for f in foreign)


def test_sweep_keeps_the_temp_file_of_a_live_writer(root):
    root.mkdir()
    live, dead = (root / f".ref-causal-{c * 32}.safetensors.{c * 3}.tmp" for c in "ab")
    live.write_bytes(b"x")
    dead.write_bytes(b"x")
    _age(dead, 2 * cachedir.STALE_SECONDS)
    with cachedir.writing(root):  # another run is writing a reference right now
        removed = [p for p, _ in cachedir.sweep_temps(root)]
    assert removed == [dead] and live.exists()


def test_a_reference_in_use_is_not_removed(lm, root):
    ref = reference(lm)
    path = ref.path
    assert not cachedir.remove_file(path) and path.exists()
    del ref
    gc.collect()
    assert cachedir.remove_file(path) and not path.exists()


def test_an_unreadable_reference_is_an_error_and_kept(lm, root, monkeypatch):
    """Unreadable here (permissions, fd or memory limits) says nothing about the file: it stays."""
    path = reference(lm).path

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(cache, "CacheFile", refuse)
    with pytest.raises(OSError, match=r"cannot read the cached .* \(Permission denied\)"):
        reference(lm, never)
    assert path.exists()
