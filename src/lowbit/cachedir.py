"""The root of everything lowbit caches (references, converted models) and its housekeeping:
``$LOWBIT_CACHE``, else ``$XDG_CACHE_HOME/lowbit``, else ``~/.cache/lowbit``.

Housekeeping shared by every kind of entry: the free disk and memory an entry needs, the
directory lock writers hold, and the sweep of temp files a killed run left behind.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .errors import LowbitError

try:
    import fcntl
except ImportError:  # no flock (Windows): temp files are then swept by age only
    fcntl = None

STALE_SECONDS = 3600  # a temp file nobody has touched for an hour belongs to a dead run
# What lowbit writes, and nothing else, is listed, cleared and swept: LOWBIT_CACHE may name a
# directory that holds other files (even /tmp). Entries: references and converted models.
ENTRY = re.compile(r"(ref-(causal|encoder)-[0-9a-f]{32}\.safetensors|model-[0-9a-f]{32})")
# atomic_file / atomic_dir temps of an entry (".ENTRY.XXXX.tmp", ".old" while replacing one)
_OWN_TEMP = re.compile(r"\.(ref-(causal|encoder)-[0-9a-f]{32}\.safetensors|model-[0-9a-f]{32})\.\w+\.(tmp|old)")
# safetensors (>= 0.6) writes ".tmpXXXXXX" beside its target, our temp file, then renames it
_SAFETENSORS_TEMP = re.compile(r"\.tmp[A-Za-z0-9]{6}")


def cache_dir() -> Path:
    if os.environ.get("LOWBIT_CACHE"):
        return Path(os.environ["LOWBIT_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowbit"


def cache_root() -> Path:
    """``cache_dir()``, which may not exist yet; a one-line error if it is something else than a directory."""
    root = cache_dir()
    if root.exists() and not root.is_dir():
        name = "LOWBIT_CACHE" if os.environ.get("LOWBIT_CACHE") else "the lowbit cache"
        raise NotADirectoryError(f"{name} is not a directory: {root}")
    return root


def writable_root() -> Path:
    """The cache root about to be written: created, once a file could really be made there
    (``os.access`` says yes to root on a read-only mount), and cleared of what killed runs
    left (it would count against the free space); a one-line error otherwise, before any work."""
    root = cache_root()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the cache directory {root} ({e.strerror}); set LOWBIT_CACHE") from e
    try:
        with tempfile.TemporaryFile(dir=root):
            pass
    except OSError as e:
        raise PermissionError(f"cannot write to the cache directory {root} ({e.strerror}); set LOWBIT_CACHE") from e
    sweep_temps(root)
    return root


class CacheSpaceError(LowbitError, OSError):
    """Not enough disk or memory for a cache entry (``errno`` ENOSPC or ENOMEM)."""

    def __init__(self, message: str, code: int = errno.ENOSPC):
        super().__init__(message)
        self.errno = code


# ---- resources


def free_disk(directory: Path) -> int:
    return shutil.disk_usage(directory).free


def free_memory() -> int | None:
    """Bytes this process may still allocate: MemAvailable, capped by a cgroup v2 limit (a container's
    OOM killer acts on that one). None where neither can be read."""
    found = []
    with suppress(OSError, ValueError, StopIteration), open("/proc/meminfo") as f:
        found.append(int(next(line for line in f if line.startswith("MemAvailable:")).split()[1]) * 1024)
    with suppress(OSError, ValueError):
        cgroup = Path("/sys/fs/cgroup")
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            used = int((cgroup / "memory.current").read_text())
            stat = dict(line.split() for line in (cgroup / "memory.stat").read_text().splitlines())
            found.append(int(limit) - used + int(stat.get("inactive_file", 0)))  # page cache it can drop
    return min(found) if found else None


def check_space(what: str, *, disk: int, memory: int, directory: Path, hint: str) -> None:
    """A one-line ``CacheSpaceError`` if ``disk`` bytes do not fit in ``directory`` or ``memory`` bytes in RAM."""
    free = free_disk(directory)
    if disk > free:
        raise CacheSpaceError(f"{what} needs {_gb(disk)} of disk; {_gb(free)} free in {directory}; {hint}")
    available = free_memory()
    if available is not None and memory > available:
        raise CacheSpaceError(f"{what} needs {_gb(memory)} of memory; {_gb(available)} available; {hint}",
                              errno.ENOMEM)


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


# ---- locks and temp files


@contextmanager
def _dir_lock(directory: Path, mode: int) -> Iterator[bool]:
    """Yields whether ``flock(mode)`` on the directory was granted (always False without flock)."""
    if fcntl is None:
        yield False
        return
    fd = os.open(directory, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, mode)
            granted = True
        except BlockingIOError:
            granted = False
        yield granted
    finally:
        os.close(fd)


def lock_shared(fd: int) -> None:
    """A reader's shared lock on an open cache file (none without flock): ``remove_file`` skips it."""
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_SH)


@contextmanager
def writing(directory: Path) -> Iterator[None]:
    """Held while a cache entry is written there: ``sweep_temps`` then leaves temps of LOCKED_TEMPS alone."""
    with _dir_lock(directory, fcntl.LOCK_SH if fcntl else 0):
        yield


def is_entry(name: str) -> bool:
    return ENTRY.fullmatch(name) is not None


def is_temp(name: str) -> bool:
    """An entry's temp (atomic_file/atomic_dir), or safetensors' own ``.tmpXXXXXX``."""
    return _OWN_TEMP.fullmatch(name) is not None or _SAFETENSORS_TEMP.fullmatch(name) is not None


def sweep_temps(root: Path | None = None) -> list[tuple[Path, int]]:
    """Remove the temp files and directories killed runs left; returns ``(path, bytes)`` of each.

    Writers of references and converted models hold a shared lock on the directory while they
    write: when the exclusive lock is granted none is under way, and an entry's temp goes at
    once (otherwise once nothing in it changed for an hour). safetensors' ``.tmpXXXXXX`` names
    are not ours alone, so one goes only when no writer holds the lock and it is an hour old.
    """
    root = cache_root() if root is None else root
    if not root.is_dir():
        return []
    removed = []
    with _dir_lock(root, fcntl.LOCK_EX | fcntl.LOCK_NB if fcntl else 0) as idle:
        for p in root.iterdir():
            own = _OWN_TEMP.fullmatch(p.name) is not None
            if not own and _SAFETENSORS_TEMP.fullmatch(p.name) is None:
                continue
            stale = time.time() - last_change(p) > STALE_SECONDS
            if (own and (idle or stale)) or (idle and stale):
                size = tree_size(p)
                remove_tree(p)
                removed.append((p, size))
    return removed


def last_change(p: Path) -> float:
    with suppress(OSError):
        if p.is_dir():
            return max([p.stat().st_mtime, *(f.stat().st_mtime for f in p.rglob("*"))])
        return p.stat().st_mtime
    return time.time()  # vanished or unreadable: treat as fresh, leave it alone


def tree_size(p: Path) -> int:
    with suppress(OSError):
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
        return p.stat().st_size
    return 0


def remove_file(path: Path) -> bool:
    """Unlink a cache file unless a reader holds it (its shared flock); whether it was removed."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)


def remove_tree(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        # renamed first: a concurrent reader finds the entry gone, not half deleted
        doomed = p if is_temp(p.name) else p.with_name(f".{p.name}.{os.getpid()}.tmp")
        with suppress(OSError):
            os.replace(p, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    else:
        p.unlink(missing_ok=True)
