"""A model's file hash: sha256 of its bytes, recomputed when they change, and over a directory's names too."""

from __future__ import annotations

from lowbit.models.hashing import file_sha256, files_sha256

from .helpers import sha256_of


def test_file_hash_follows_content_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 10)
    first = file_sha256(f)
    assert first == sha256_of(f) == files_sha256([f])
    f.write_bytes(b"b" * 11)  # new size (and mtime): the cache must not answer with the old hash
    assert file_sha256(f) == sha256_of(f) != first


def test_directory_hash_covers_names_and_contents(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(b"1")
    (tmp_path / "b.safetensors").write_bytes(b"2")
    files = sorted(tmp_path.iterdir())
    h = files_sha256(files, root=tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"3")
    assert files_sha256(files, root=tmp_path) != h
