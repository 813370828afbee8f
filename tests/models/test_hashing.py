"""A model's file hash: sha256 of its bytes, recorded in the cache and read again only when the file's stat
(size, mtime, ctime, inode, device) or path changes or ``verify`` asks; over a directory's names too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest

from lowbit.models import hashing
from lowbit.models.hashing import RECORDS, file_sha256, files_sha256, read_sha256

from .helpers import sha256_of


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def settled(monkeypatch):
    """Files written by the test count as settled: they are milliseconds old, the rule wants seconds
    (test_a_file_changed_moments_ago_is_not_recorded keeps the rule)."""
    monkeypatch.setattr(hashing, "_SETTLED_NS", 0)


@pytest.fixture
def reads(monkeypatch):
    """The files hashing has read, in order."""
    seen = []
    real = hashing._read

    def counted(f):
        seen.append(f.name)
        return real(f)

    monkeypatch.setattr(hashing, "_read", counted)
    return seen


def _record(cache):
    (found,) = (cache / RECORDS).iterdir()
    return found


def test_file_hash_follows_content_changes(tmp_path, cache):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 10)
    first = file_sha256(f)
    assert first == sha256_of(f) == files_sha256([f]) == read_sha256(f)
    f.write_bytes(b"b" * 11)  # new size (and mtime): the cache must not answer with the old hash
    assert file_sha256(f) == sha256_of(f) != first


def test_directory_hash_covers_names_and_contents(tmp_path, cache):
    (tmp_path / "a.safetensors").write_bytes(b"1")
    (tmp_path / "b.safetensors").write_bytes(b"2")
    files = sorted(p for p in tmp_path.iterdir() if p.is_file())
    h = files_sha256(files, root=tmp_path)
    (tmp_path / "b.safetensors").write_bytes(b"3")
    assert files_sha256(files, root=tmp_path) != h


def test_a_recorded_hash_is_used_without_reading_the_file(tmp_path, cache, settled, reads, monkeypatch):
    (tmp_path / "a.safetensors").write_bytes(b"1" * 100)
    (tmp_path / "config.json").write_text("{}")
    files = hashing.model_files(tmp_path)
    whole = files_sha256(files, root=tmp_path)
    assert len(reads) == 2 and len(list((cache / RECORDS).iterdir())) == 2
    entry = json.loads((cache / RECORDS / hashing._record_path(files[0].resolve()).name).read_text())
    st = os.stat(files[0])
    assert entry == {"path": str(files[0].resolve()), "size": 100, "mtime_ns": st.st_mtime_ns,
                     "ctime_ns": st.st_ctime_ns, "inode": st.st_ino, "device": st.st_dev,
                     "sha256": sha256_of(files[0])}
    monkeypatch.setattr(hashing, "open", None, raising=False)  # neither file may be opened again
    assert files_sha256(files, root=tmp_path) == whole and file_sha256(files[0]) == sha256_of(files[0])
    assert len(reads) == 2


def _touch(f):
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns - 10**9))


def _replace(f):
    """The same bytes and mtime in a new file (a new inode) renamed over the old one."""
    new = f.with_name("new")
    new.write_bytes(f.read_bytes())
    st = f.stat()
    os.utime(new, ns=(st.st_atime_ns, st.st_mtime_ns))
    keep = f.with_name("kept")  # held, so that the new file cannot reuse the old inode
    os.link(f, keep)
    os.replace(new, f)
    return f


def _resize(f):
    st = f.stat()
    with open(f, "ab") as out:
        out.write(b"!")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    return f


def _move(f):
    return f.rename(f.with_name("moved.bin"))


def _restore_mtime(f):
    """The bytes change and the mtime is set back (cp -p, tar, rsync -t): only the ctime tells."""
    st = f.stat()
    f.write_bytes(b"Y" * st.st_size)
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    return f


CHANGES = {"touched": lambda f: (_touch(f), f)[1], "replaced": _replace, "resized": _resize, "moved": _move,
           "rewritten, mtime kept": _restore_mtime}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_file_is_read_again(tmp_path, cache, settled, reads, change):
    f = tmp_path / "w.bin"
    f.write_bytes(b"X" * 64)
    file_sha256(f)
    file_sha256(f)
    assert len(reads) == 1
    f = CHANGES[change](f)
    assert file_sha256(f) == sha256_of(f) and len(reads) == 2
    file_sha256(f)  # and recorded again
    assert len(reads) == 2


FORGED = {"size": 65, "mtime_ns": 1, "ctime_ns": 1, "inode": 1, "device": 1, "path": "/elsewhere",
          "sha256": "0" * 63}


@pytest.mark.parametrize("field", list(FORGED))
def test_a_record_that_differs_in_any_field_is_not_used(tmp_path, cache, settled, reads, field):
    f = tmp_path / "w.bin"
    f.write_bytes(b"X" * 64)
    file_sha256(f)
    record = _record(cache)
    entry = json.loads(record.read_text())
    record.write_text(json.dumps(entry | {field: FORGED[field]}))
    assert file_sha256(f) == sha256_of(f) and len(reads) == 2
    assert json.loads(record.read_text()) == entry  # rewritten as it should be


@pytest.mark.parametrize("damage", ["", "{not json", "[]", '{"path": 1}', "\xff\xfe"])
def test_an_unreadable_record_is_read_again_silently(tmp_path, cache, settled, reads, damage):
    f = tmp_path / "w.bin"
    f.write_bytes(b"X" * 64)
    file_sha256(f)
    entry = _record(cache).read_text()
    _record(cache).write_text(damage, encoding="latin-1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert file_sha256(f) == sha256_of(f) and len(reads) == 2
    assert _record(cache).read_text() == entry


def test_verify_reads_the_file_whatever_the_record_says(tmp_path, cache, settled, reads):
    f = tmp_path / "w.bin"
    f.write_bytes(b"X" * 64)
    file_sha256(f)
    assert file_sha256(f, verify=True) == sha256_of(f) and len(reads) == 2
    assert files_sha256([f], root=tmp_path, verify=True) and len(reads) == 3
    file_sha256(f)
    assert len(reads) == 3


def test_a_file_changed_moments_ago_is_not_recorded(tmp_path, cache, reads):
    """Its next change could land in the same timestamp tick and leave size, mtime and ctime as recorded."""
    f = tmp_path / "w.bin"
    f.write_bytes(b"X" * 64)
    file_sha256(f)
    file_sha256(f)
    assert len(reads) == 2 and not (cache / RECORDS).exists()


def test_a_file_that_changes_while_it_is_read_is_not_recorded(tmp_path, cache, settled, monkeypatch):
    f = tmp_path / "w.bin"
    f.write_bytes(b"X" * 64)
    real = hashing._read

    def read_then_append(handle):
        digest = real(handle)
        with open(f, "ab") as out:
            out.write(b"more")
        return digest

    monkeypatch.setattr(hashing, "_read", read_then_append)
    file_sha256(f)
    assert not (cache / RECORDS).exists()


@pytest.mark.parametrize("where", ["under a file", "a file", "records dir a file"])
def test_an_unwritable_cache_still_gives_the_hash(tmp_path, monkeypatch, settled, where):
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    root = {"under a file": blocker / "cache", "a file": blocker, "records dir a file": tmp_path / "cache"}[where]
    if where == "records dir a file":
        root.mkdir()
        (root / RECORDS).write_text("")
    monkeypatch.setenv("LOWBIT_CACHE", str(root))
    f = tmp_path / "w.bin"
    f.write_bytes(b"X" * 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert file_sha256(f) == file_sha256(f) == sha256_of(f)
    assert blocker.read_text() == "" and not [p for p in tmp_path.rglob("*") if p.name.endswith((".json", ".tmp"))]


_WRITER = """
import sys
from lowbit.models import hashing
hashing._SETTLED_NS = 0
files = sys.argv[1:]
for _ in range(40):
    for f in files:
        hashing.file_sha256(f, verify=True)
"""


def test_processes_recording_at_once_leave_whole_records(tmp_path, cache, settled, reads):
    files = []
    for i in range(3):
        files.append(tmp_path / f"w{i}.bin")
        files[-1].write_bytes(bytes([i]) * (1000 + i))
    env = os.environ | {"LOWBIT_CACHE": str(cache)}
    writers = [subprocess.Popen([sys.executable, "-c", _WRITER, *map(str, files)], env=env) for _ in range(4)]
    assert [w.wait(timeout=120) for w in writers] == [0] * 4
    assert sorted(p.name for p in (cache / RECORDS).iterdir()) == sorted(
        hashing._record_path(f.resolve()).name for f in files)  # no temp left behind
    assert [file_sha256(f) for f in files] == [sha256_of(f) for f in files] and reads == []
