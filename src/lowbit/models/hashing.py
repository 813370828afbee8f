"""sha256 of model files, for cache keys (reference log-probs and the like)."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from pathlib import Path

_CHUNK = 1 << 20  # 1 MiB reads: a 100 MB file hashes in ~0.2 s without holding it in memory

# What makes two checkpoints different: their weights and their config. Tokenizer and
# README files are left out so that editing a model card does not invalidate caches.
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.gguf", "*.pt", "*.pth", "config.json")


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of one file, cached by (resolved path, mtime, size): a changed file rehashes."""
    p = Path(path).resolve()
    st = p.stat()
    return _sha256_cached(str(p), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=256)
def _sha256_cached(path: str, mtime_ns: int, size: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def model_files(directory: str | Path) -> list[Path]:
    """The files of a model directory that ``files_sha256`` covers, sorted by relative path."""
    d = Path(directory)
    found = {p for pattern in WEIGHT_PATTERNS for p in d.rglob(pattern) if p.is_file()}
    return sorted(found, key=lambda p: p.relative_to(d).as_posix())


def files_sha256(files: list[Path], root: str | Path | None = None) -> str:
    """One sha256 over several files: each file's relative name and its own sha256, in order.

    A single file (a ``.gguf``) hashes to its plain sha256, so it can be checked with ``sha256sum``.
    """
    if len(files) == 1 and root is None:
        return file_sha256(files[0])
    h = hashlib.sha256()
    for f in files:
        name = Path(f).relative_to(root).as_posix() if root is not None else Path(f).name
        h.update(f"{name}\0{file_sha256(f)}\n".encode())
    return h.hexdigest()
