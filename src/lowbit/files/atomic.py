"""Writing files: atomically (a reader sees the old file or the whole new one, never half of it), with the
permissions of any new file."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from safetensors import SafetensorError

from ..cachedir import STALE_SECONDS, last_change
from ..errors import InputError
from .outputs import check_outside_cache

if TYPE_CHECKING:
    import torch

# A temp beside an output is ".NAME.PID_XXXXXXXX.tmp" (".old": a directory being replaced), XXXXXXXX
# mkstemp's 8 random characters (tempfile._RandomNameSequence). The writer's pid in the name lets a later
# run remove what a killed one left (SIGKILL, a power cut: nothing of it ran) and keep a running one's.
_RANDOM = r"[a-z0-9_]{8}"
# numpy's ndarray.tofile (what gguf-py writes tensors with) on a short fwrite, with no errno
_SHORT_WRITE = re.compile(r"(\d+) requested and (\d+) written")


@contextmanager
def atomic_file(path: str | os.PathLike, *, overwrite: bool = True,
                replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yields a temp path beside ``path``; on success it is renamed over ``path``, on error removed.

    An existing ``path`` that is not a regular file (a device such as /dev/null, a FIFO, a directory)
    is refused: the rename would replace it, and as root that replaces /dev/null for every program.
    Without ``overwrite`` an existing file is an error; with ``replaceable``, a file it refuses is, asked
    at the rename (the file may have appeared or changed meanwhile)."""
    path = Path(path)
    check_replaceable(path)
    check_outside_cache(path)
    sweep_stale_temps(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        chmod_as_new(tmp)  # mkstemp makes 0600; the result should look like any new file
        yield Path(tmp)
        _fsync(tmp)  # the data is on disk before the name points at it (a crash leaves old or new)
        if path.exists() and not overwrite:
            raise FileExistsError(f"output exists: {path} (it appeared while this run was writing)")
        if path.exists() and replaceable is not None and not replaceable(path):
            raise FileExistsError(f"{path} changed while this run was writing and may no longer be replaced; "
                                  "it is left as it was")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike, *, overwrite: bool = False,
               replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yields a temp directory beside ``path``, renamed to ``path`` when the block succeeds.

    An interrupted or failed write leaves no ``path`` (and no temp directory). An existing
    ``path`` is an error unless ``overwrite``; it is then replaced only after the new one is
    complete, and only if ``replaceable(old)`` agrees, asked again at that moment: the directory
    may have changed, or appeared, while the new one was being written.
    """
    path = check_output_dir(path, overwrite=overwrite)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    try:
        chmod_as_new(tmp)  # mkdtemp makes 0700
        yield tmp
        for f in tmp.rglob("*"):
            if f.is_file():
                _fsync(f)
        if path.exists():
            if not overwrite:
                raise FileExistsError(f"output exists: {path} (it appeared while this run was writing)")
            # two renames, not one: os.replace cannot put a directory over a non-empty one.
            # The old one moves to a fresh empty name (never a fixed one that a user's file may hold).
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".old", dir=path.parent))
            os.replace(path, old)
            try:
                if replaceable is not None and not replaceable(old):
                    raise FileExistsError(f"{path} changed while this run was writing and may no longer be "
                                          "replaced; it is left as it was")
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)  # put the user's directory back
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def write_errors(target: str | os.PathLike) -> Iterator[None]:
    """Reports a failed write (disk full, quota, I/O error) as one OSError naming ``target``.

    safetensors raises its own ``SafetensorError`` for I/O failures, with the OS error only in
    its text ("... (os error 28)"); it becomes the OSError it stands for. numpy's ``tofile`` (gguf-py's
    tensor writer) says only "N requested and M written": ENOSPC when the disk has no room for the rest.
    """
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT) and e.filename is None:
            raise OSError(e.errno, os.strerror(e.errno), str(target)) from e
        short = _SHORT_WRITE.fullmatch(str(e)) if e.errno is None else None
        if short is not None:
            raise _short_write(target, int(short[1]) - int(short[2])) from e
        raise
    except SafetensorError as e:
        code = re.search(r"\(os error (\d+)\)", str(e))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(target)) from e


def _short_write(target: str | os.PathLike, missing: int) -> OSError:
    """The OSError a short write of ``missing`` bytes to ``target`` stands for: ENOSPC if the disk holds
    less than that (the temp file still takes its space), else EIO (a quota or the device failed)."""
    try:
        free = shutil.disk_usage(Path(target).parent).free
    except OSError:
        free = 0
    code = errno.ENOSPC if free < missing else errno.EIO
    return OSError(code, os.strerror(code), str(target))


def check_output_file(path: str | os.PathLike) -> Path:
    """``path`` as a Path, if a file can be written there: a regular file or nothing, outside lowbit's
    cache, in a directory where files can be created; else a one-line error."""
    path = Path(path)
    check_replaceable(path)
    check_outside_cache(path)
    check_can_create_in(path.parent)  # Path("x").parent is Path(".")
    return path


def check_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """``path`` as a Path, if a directory can be created there; else a one-line OSError.
    Stale temps a killed run left beside it go first (``sweep_stale_temps``)."""
    given, path = path, Path(os.path.abspath(path))  # "." has no name to build temp names from
    if path.is_symlink():
        raise FileExistsError(f"output is a symbolic link: {given}; name the directory it points to")
    if path == Path.cwd() or path in Path.cwd().parents:
        raise FileExistsError(f"output {given} is the current directory or holds it; name another one")
    check_outside_cache(path)
    sweep_stale_temps(path)  # first: it may put back a directory a run killed mid-swap had moved aside
    if path.exists() and not (overwrite and path.is_dir()):
        raise FileExistsError(f"output exists: {path}" + (" (pass --overwrite to replace it)" if path.is_dir() else ""))
    check_can_create_in(path.parent)
    return path


def check_replaceable(path: Path) -> None:
    """A one-line error if ``path`` exists and is not a regular file (a directory, /dev/null, a FIFO):
    ``atomic_file``'s rename would replace it."""
    if path.is_dir():
        raise IsADirectoryError(f"is a directory, not a file: {path}")
    if path.exists() and not path.is_file():
        raise InputError(f"not a regular file: {path} (lowbit writes files by renaming a new one over the name)")


def check_can_create_in(directory: Path) -> None:
    """A one-line OSError unless a file can be created in ``directory``. Tried, not inferred
    from permission bits: root passes ``os.access`` on read-only mounts and on ``/proc``."""
    if not directory.is_dir():
        raise FileNotFoundError(f"directory does not exist: {directory}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".lowbit-probe.", dir=directory)
    except OSError as e:
        raise PermissionError(f"cannot write to directory: {directory} ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(probe)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}_"


def sweep_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temps a killed lowbit run left beside ``path`` (``.NAME.PID_XXXXXXXX.tmp``/``.old``
    whose PID runs no more); returns what it removed. Temps named before the pid was (``.NAME.XXXXXXXX.tmp``)
    go once nothing in them changed for ``STALE_SECONDS``, as in the cache. A ``.old`` is the user's earlier
    output, moved aside while a new one took its place: put back if ``path`` is missing, else removed."""
    path = Path(os.path.abspath(path))
    stem = re.escape(f".{path.name}.")
    named = re.compile(stem + rf"(\d+)_{_RANDOM}\.(tmp|old)")
    legacy = re.compile(stem + rf"{_RANDOM}\.(tmp|old)")
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return []
    removed = []
    for p in sorted(entries, key=lambda p: p.suffix != ".old"):  # .old first: it may become ``path`` again
        m = named.fullmatch(p.name)
        if m is not None:
            dead = not _alive(int(m[1]))
        else:
            dead = legacy.fullmatch(p.name) is not None and time.time() - last_change(p) > STALE_SECONDS
        if not dead:
            continue
        if p.suffix == ".old" and not path.exists() and p.is_dir() and any(p.iterdir()):
            os.replace(p, path)
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)
    return removed


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists here (a reused pid reads as alive: its temp is kept, never wrongly removed)."""
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill terminates the process whatever the signal
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    except (OverflowError, ValueError, OSError):  # not a pid this system can have
        return False
    return True


def _fsync(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def chmod_as_new(path: str | os.PathLike) -> None:
    """Give ``path`` the permissions ``open`` (``mkdir`` for a directory) would have given it: 0o666 (0o777) less
    the umask. For what is made 0600 (0700): mkstemp's and mkdtemp's temps, safetensors' ``save_file``."""
    mask = os.umask(0)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~mask)


def write_json(path: str | os.PathLike, data: object) -> Path:
    """``data`` as indented JSON at ``path``, atomically. A NaN or infinite float (a format
    that diverged) becomes null: ``NaN`` is not JSON, and strict parsers reject the file."""
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(_finite(data), f, indent=2, allow_nan=False)
        f.write("\n")
    return Path(path)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``save_file`` with the permissions of any new file: safetensors writes a 0600 temp file and
    renames it, so model.safetensors alone would be unreadable to the group where the umask allows it."""
    from safetensors.torch import save_file  # imports torch: not for the commands that load no model

    save_file(tensors, path, metadata={"format": "pt"})
    chmod_as_new(path)


def _finite(data):
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: _finite(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_finite(v) for v in data]
    return data
