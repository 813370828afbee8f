"""Atomic file and directory writes: the old content or the whole new one, never a mix."""

import json
import os

import pytest

from lowbit.files.atomic import atomic_dir, atomic_file, save_tensors, write_json


def test_write_json_is_strict_json(tmp_path):
    out = write_json(tmp_path / "r.json", {"kl": float("nan"), "ppl": [1.5, float("inf")], "n": 3})
    assert json.loads(out.read_text(), parse_constant=pytest.fail) == {"kl": None, "ppl": [1.5, None], "n": 3}


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_overwrite_replaces_a_directory_whole(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "stale").write_text("x")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
        raise RuntimeError
    assert os.listdir(target) == ["stale"]  # a failed overwrite leaves the old directory
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["d"]
    with pytest.raises(FileExistsError, match="--overwrite"), atomic_dir(target):
        pass


def test_a_directory_that_appears_during_the_write_is_never_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while"), atomic_dir(target) as tmp:
        (tmp / "new").write_text("y")
        target.mkdir()  # another run, or the user, created it meanwhile
        (target / "precious").write_text("mine")
    assert os.listdir(target) == ["precious"] and os.listdir(tmp_path) == ["out"]


def test_overwrite_asks_again_at_the_swap(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(FileExistsError, match="changed while"), \
            atomic_dir(target, overwrite=True, replaceable=lambda old: not any(old.iterdir())) as tmp:
        (tmp / "new").write_text("y")
        (target / "precious").write_text("written meanwhile")
    assert os.listdir(target) == ["precious"] and os.listdir(tmp_path) == ["out"]


def test_current_directory_and_symlinks_are_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "real")
    for target, match in ((".", "current directory"), (tmp_path / "link", "symbolic link")):
        with pytest.raises(FileExistsError, match=match), atomic_dir(target, overwrite=True):
            pytest.fail("must not start")
    assert sorted(os.listdir(tmp_path)) == ["link", "real"] and os.listdir(tmp_path / "real") == []


def test_a_file_is_replaced_only_as_allowed_at_the_rename(tmp_path):
    """export --to gguf's rule: no existing file without overwrite, and with it only one ``replaceable`` accepts,
    asked after the new file is written (a file may appear or change meanwhile); the temp never stays."""
    target = tmp_path / "m.gguf"
    with pytest.raises(FileExistsError, match="appeared while"), atomic_file(target, overwrite=False) as tmp:
        tmp.write_text("new")
        target.write_text("theirs")
    with pytest.raises(FileExistsError, match="changed while"), \
            atomic_file(target, replaceable=lambda p: p.read_text() == "ours") as tmp:
        tmp.write_text("new")
    assert os.listdir(tmp_path) == ["m.gguf"] and target.read_text() == "theirs"
    target.write_text("ours")
    with atomic_file(target, replaceable=lambda p: p.read_text() == "ours") as tmp:
        tmp.write_text("new")
    assert os.listdir(tmp_path) == ["m.gguf"] and target.read_text() == "new"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_tensors_have_the_permissions_of_any_new_file(tmp_path, umask):
    """safetensors writes 0600; save_tensors gives the file what the umask gives a new one, and marks it
    as torch's ("format": "pt", what transformers' from_pretrained asks of a model.safetensors)."""
    import torch
    from safetensors import safe_open

    before = os.umask(umask)
    try:
        save_tensors({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp_path / "m.safetensors")
    finally:
        os.umask(before)
    assert oct(os.stat(tmp_path / "m.safetensors").st_mode & 0o777) == oct(0o666 & ~umask)
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and f.get_tensor("w").tolist() == [[0, 1, 2], [3, 4, 5]]
