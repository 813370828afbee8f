"""sha256 of model files, for cache keys (reference log-probs, converted GGUF files), read once per file.

A file's sha256 is recorded in the lowbit cache, ``cache_dir()/file-sha256/``: one small JSON file per model
file, named after its resolved path, holding that path, the hash and what ``stat`` said of the file when it
was read (size, mtime, ctime, inode, device). ``file_sha256`` answers from the record when all of them still
match, so a later load of a 16 GB checkpoint costs a ``stat`` per file, not ~40 s of reading. A file written,
touched, resized, replaced (a new inode) or moved (another path) is read again; so is one copied over with
its old mtime kept (``cp -p``), which sets its ctime, a time nobody can set back. Damage that bypasses the
file system (a failing disk) changes none of them: ``verify=True`` (``--verify``) reads every file again.

Not recorded, so read again next time: a file that changed while it was read, and one whose ctime is less
than ``_SETTLED_NS`` old, whose next change could fall in the same timestamp tick and leave every field as
recorded (git's "racy clean" entries). One record per file, replaced atomically, keeps two processes from
losing or corrupting each other's records; the last writer wins. A record that cannot be read (missing,
truncated, garbage) is ignored and rewritten, and one that cannot be written is skipped: a cache never fails a load.

When a file is first read: the loaders hash a GGUF file before transformers converts it (the hash names the
converted-model cache, so it must come first; the conversion then reads the pages this read cached), and
the files of a safetensors directory after transformers has memory-mapped them (a second pass, over the page
cache when the checkpoint fits in memory). Only the first load of a file pays for either.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import time
from contextlib import suppress
from pathlib import Path

from ..cachedir import cache_dir

_CHUNK = 1 << 20  # 1 MiB reads: a 100 MB file hashes in ~0.2 s without holding it in memory
RECORDS = "file-sha256"  # the records' directory in the cache root
# FAT's 2-second timestamps are the coarsest in common use (ext4 and XFS tick in kernel jiffies, 1-10 ms)
_SETTLED_NS = 2_000_000_000
_SHA256 = re.compile(r"[0-9a-f]{64}")

# What makes two checkpoints different: their weights and their config. Tokenizer and
# README files are left out so that editing a model card does not invalidate caches.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "config.json")


def file_sha256(path: str | Path, *, verify: bool = False) -> str:
    """Hex sha256 of one file: the recorded one while the file's stat matches its record, else read
    (and recorded). ``verify``: read it whatever the record says."""
    p = Path(path).resolve()
    record = _record_path(p)
    if not verify:
        found = _recorded(record, p, os.stat(p))
        if found is not None:
            return found
    with open(p, "rb") as f:
        before = _fields(os.fstat(f.fileno()))
        sha256 = _read(f)
        after = os.fstat(f.fileno())
    if _fields(after) == before and time.time_ns() - after.st_ctime_ns >= _SETTLED_NS:
        _write(record, {"path": str(p), **before, "sha256": sha256})
    return sha256


def read_sha256(path: str | Path) -> str:
    """Hex sha256 of one file, read now and recorded nowhere (a temp file, about to be renamed)."""
    with open(path, "rb") as f:
        return _read(f)


def _read(f) -> str:
    h = hashlib.sha256()
    while chunk := f.read(_CHUNK):
        h.update(chunk)
    return h.hexdigest()


def _fields(st: os.stat_result) -> dict:
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns,
            "inode": st.st_ino, "device": st.st_dev}


def _record_path(p: Path) -> Path:
    # cache_dir(), not the checked cache_root(): a LOWBIT_CACHE that is a file fails the record's read and
    # write (both skipped), never the hash
    return cache_dir() / RECORDS / f"{hashlib.sha256(os.fsencode(p)).hexdigest()[:32]}.json"


def _recorded(record: Path, p: Path, st: os.stat_result) -> str | None:
    try:
        entry = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("path") != str(p):
        return None
    if any(entry.get(key) != value for key, value in _fields(st).items()):
        return None
    sha256 = entry.get("sha256")
    return sha256 if isinstance(sha256, str) and _SHA256.fullmatch(sha256) else None


def _write(record: Path, entry: dict) -> None:
    tmp = None
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{record.stem}.", suffix=".tmp", dir=record.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f)  # ensure_ascii: a path that is no valid UTF-8 survives as \udcXX escapes
        os.replace(tmp, record)  # a reader sees the old record or this one, never half of one
    except OSError:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)


def model_files(directory: str | Path) -> list[Path]:
    """The files of a model directory that ``files_sha256`` covers, sorted by relative path."""
    d = Path(directory)
    found = {p for pattern in WEIGHT_PATTERNS for p in d.rglob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.relative_to(d).as_posix())


def files_sha256(files: list[Path], root: str | Path | None = None, *, verify: bool = False) -> str:
    """One sha256 over several files: each file's relative name and its own sha256, in order.

    A single file (a ``.gguf``) hashes to its plain sha256, so it can be checked with ``sha256sum``.
    """
    if len(files) == 1 and root is None:
        return file_sha256(files[0], verify=verify)
    h = hashlib.sha256()
    for f in files:
        name = Path(f).relative_to(root).as_posix() if root is not None else Path(f).name
        h.update(f"{name}\0{file_sha256(f, verify=verify)}\n".encode())
    return h.hexdigest()
