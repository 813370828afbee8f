"""The reference cache: file names, integrity, free space, and what a killed run left behind.

The root is ``lowbit.cachedir.cache_dir()``. Each reference is one safetensors file whose
metadata holds its description (``lowbit-cache``: kind, model, protocol, created), so a
listing reads headers only, and the sha256 of every tensor's bytes (``lowbit-sha256``; per
row along dim 0 for tensors over 16 MB, so rows hash on several cores). ``CacheFile`` checks
them all once, when the file is opened: a flipped byte gives a one-line notice and a
recomputation, never a NaN KL. Rows are then read from a mapping of that same open file, so
what was checked is what is read. Checking once costs ~1 s for the default 0.8 GB reference
(sha256 runs at ~1 GB/s per core); checking each window as it is scored would cost as much
again for every format a ``compare`` scores. A reader holds a shared ``flock`` on its file and
a writer one on the directory: ``lowbit cache clear`` skips files in use, and the sweep of
temp files knows when no write is under way.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import math
import mmap
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import TypeVar

import torch
from safetensors.torch import save_file

from ..cachedir import CacheSpaceError, cache_root, lock_shared, writing
from ..files.atomic import atomic_file, write_errors
from .cache_header import CHECKSUM_KEY, DESCRIPTION_KEY, CacheIntegrityError, read_header

log = logging.getLogger(__name__)
T = TypeVar("T")

# Bump when what a cache file holds, or how it is computed, changes: old files are then ignored.
CACHE_VERSION = 1
ROW_HASH_BYTES = 1 << 24  # tensors larger than this get one sha256 per row
# safetensors dtype names (its format spec, README "Format")
_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def cache_path(kind: str, **key) -> Path:
    """A file name from the sha256 of everything that determines its contents."""
    blob = json.dumps({"kind": kind, "version": CACHE_VERSION, **key}, sort_keys=True)
    return cache_root() / f"{kind}-{hashlib.sha256(blob.encode()).hexdigest()[:32]}.safetensors"


def created_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def model_label(model) -> str:
    """What a loaded model calls itself (transformers' ``config._name_or_path``), for the listing."""
    return str(getattr(getattr(model, "config", None), "_name_or_path", "") or "")


# ---- writing


def write_entry(path: Path, tensors: dict[str, torch.Tensor], description: dict) -> None:
    """``tensors`` as a safetensors file at ``path``, atomically, with ``description`` and checksums.

    A full disk is one line (``CacheSpaceError``) and leaves no temp file: atomic_file removes
    its own, safetensors (which writes a ``.tmpXXXXXX`` beside and renames) removes its.
    """
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {DESCRIPTION_KEY: json.dumps(description, sort_keys=True),
                CHECKSUM_KEY: json.dumps(_checksums(tensors), sort_keys=True)}
    try:
        with write_errors(path), writing(path.parent), atomic_file(path) as tmp:  # safetensors' too, as OSError
            save_file(tensors, tmp, metadata=metadata)
    except OSError as e:
        raise _write_error(path, e.errno, e.strerror or str(e)) from e


def _write_error(path: Path, code: int | None, reason: str) -> OSError:
    if code == errno.ENOSPC:
        return CacheSpaceError(f"No space left on device writing the reference cache {path}; free some space "
                               "(`lowbit cache clear` removes old entries) or set LOWBIT_CACHE")
    error = OSError(f"cannot write the reference cache {path} ({reason})")
    error.errno = code
    return error


def _checksums(tensors: dict[str, torch.Tensor]) -> dict:
    jobs = []  # (name, row or None, bytes)
    for name, t in tensors.items():
        rows = t.dim() >= 2 and t.nbytes > ROW_HASH_BYTES
        jobs += [(name, i, _bytes(r)) for i, r in enumerate(t)] if rows else [(name, None, _bytes(t))]
    with _pool() as pool:  # hashlib releases the GIL on large buffers
        digests = list(pool.map(lambda job: hashlib.sha256(job[2]).hexdigest(), jobs))
    out: dict = {}
    for (name, row, _), digest in zip(jobs, digests, strict=True):
        if row is None:
            out[name] = digest
        else:
            out.setdefault(name, []).append(digest)
    return out


def _bytes(t: torch.Tensor) -> memoryview:
    """The bytes safetensors stores for ``t`` (little-endian, C order), without a copy."""
    return memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy())


# ---- reading


class CacheFile:
    """An open, checked cache file: ``description``, ``tensor(name)``, ``read_row(name, i, out)``.

    The file is mapped, not read: a row goes from the page cache straight into the caller's
    float32 buffer (half the time of ``pread`` into an fp16 buffer and converting, measured).
    The mapping keeps the checked inode, and the shared lock on it, while the object lives.
    Cache files are only ever replaced by rename, never truncated in place, so the mapping
    cannot fault (SIGBUS) unless something outside lowbit truncates the file.
    """

    def __init__(self, path: Path, *, verify: bool = True):
        self.path = Path(path)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            lock_shared(fd)  # `lowbit cache clear` skips the file while this is held
            self._tensors, metadata, self._start = read_header(fd)
            size = os.fstat(fd).st_size
            self._check_layout(size - self._start)
            # ACCESS_COPY: writable to torch.frombuffer (no warning), yet nothing is ever written.
            # The mapping holds a dup of fd, and with it the lock, until it is collected.
            self._map = mmap.mmap(fd, size, access=mmap.ACCESS_COPY)
        finally:
            os.close(fd)
        try:
            self.description = json.loads(metadata[DESCRIPTION_KEY])
            checksums = json.loads(metadata[CHECKSUM_KEY])
        except (KeyError, ValueError) as e:
            raise CacheIntegrityError("it has no lowbit description or checksums (an older lowbit wrote it)") from e
        if verify:
            self._verify(checksums)

    def _check_layout(self, data_len: int) -> None:
        end = 0
        for name, info in self._tensors.items():
            try:
                begin, stop = info["data_offsets"]
                size = math.prod(info["shape"]) * _DTYPES[info["dtype"]].itemsize
            except (KeyError, TypeError, ValueError) as e:
                raise CacheIntegrityError(f"its header entry for {name!r} is malformed") from e
            if stop - begin != size or not 0 <= begin <= stop:
                raise CacheIntegrityError(f"its header entry for {name!r} is inconsistent")
            end = max(end, stop)
        if end != data_len:
            raise CacheIntegrityError(f"it holds {data_len} data bytes where its header says {end} (truncated?)")

    def _verify(self, checksums: dict) -> None:
        jobs = []  # (label, offset, length, expected sha256)
        for name, info in self._tensors.items():
            begin, stop = info["data_offsets"]
            expected = checksums.get(name)
            if isinstance(expected, str):
                jobs.append((name, self._start + begin, stop - begin, expected))
            elif isinstance(expected, list) and info["shape"] and len(expected) == info["shape"][0] > 0:
                step = (stop - begin) // len(expected)
                jobs += [(f"{name} row {i}", self._start + begin + i * step, step, digest)
                         for i, digest in enumerate(expected)]
            else:
                raise CacheIntegrityError(f"it has no usable checksum for {name}")
        with memoryview(self._map) as data, _pool() as pool:
            found = list(pool.map(lambda job: self._sha256(data, job[1], job[2]), jobs))
        for (label, *_, expected), digest in zip(jobs, found, strict=True):
            if digest != expected:
                raise CacheIntegrityError(f"{label} fails its sha256 check")

    def _sha256(self, data: memoryview, offset: int, length: int) -> str:
        digest = hashlib.sha256(data[offset:offset + length]).hexdigest()
        self._release(offset, length)
        return digest

    def _release(self, offset: int, length: int) -> None:
        """Unmap pages once read (they stay in the page cache): else the process's RSS would grow
        by the whole file, as if the reference were held in memory."""
        if hasattr(mmap, "MADV_DONTNEED"):
            start = offset - offset % mmap.PAGESIZE
            with suppress(OSError, ValueError):
                self._map.madvise(mmap.MADV_DONTNEED, start, length + offset - start)

    def _info(self, name: str) -> dict:
        if name not in self._tensors:
            raise CacheIntegrityError(f"it holds no tensor {name!r}")
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._info(name)["shape"])

    def tensor(self, name: str) -> torch.Tensor:
        """A copy in memory (not a view of the mapping)."""
        view = self._view(name)
        out = view.clone()
        if view.numel():
            self._release(self._start + self._info(name)["data_offsets"][0], view.nbytes)
        return out

    def read_row(self, name: str, i: int, out: torch.Tensor) -> torch.Tensor:
        """Row ``i`` along dim 0 copied into ``out`` (of the row's shape, any dtype)."""
        row = self._view(name)[i]
        out.copy_(row)
        self._release(self._start + self._info(name)["data_offsets"][0] + i * row.nbytes, row.nbytes)
        return out

    def _view(self, name: str) -> torch.Tensor:
        info = self._info(name)
        dtype, shape = _DTYPES[info["dtype"]], info["shape"]
        if math.prod(shape) == 0:
            return torch.empty(shape, dtype=dtype)
        offset = self._start + info["data_offsets"][0]
        return torch.frombuffer(self._map, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)


def open_cached(path: Path, read: Callable[[CacheFile], T]) -> T | None:
    """``read(file)`` of the checked cache file at ``path`` (``read`` may raise ``CacheIntegrityError``
    too), or None if there is none or it is damaged: a damaged one is removed with a one-line notice."""
    try:
        result = read(CacheFile(path))
    except (FileNotFoundError, NotADirectoryError):  # nothing cached there (yet)
        return None
    except CacheIntegrityError as e:
        log.warning("lowbit: the cached %s is damaged (%s); recomputing it", path, " ".join(str(e).split()))
        with suppress(OSError):
            path.unlink()
        return None
    except OSError as e:  # unreadable here (permissions, limits) says nothing about its contents: keep it
        raise OSError(f"cannot read the cached {path} ({e.strerror or e}); fix that, or set LOWBIT_CACHE") from e
    with suppress(OSError):
        os.utime(path)  # its mtime says when it was last used: `lowbit cache clear --older-than`
    return result


def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(min(8, os.cpu_count() or 1))
