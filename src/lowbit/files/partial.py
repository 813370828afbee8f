"""The finished shards of an output still being written, kept where a killed run can continue from them.

A streamed ``lowbit quantize -o OUT`` writes each shard, once full, into ``OUT.partial`` beside OUT (a
deterministic name: a later run finds it; a visible one: the user sees what holds the disk) and records it
in ``manifest.json``, replaced atomically after each shard: the settings that decide the bytes, each finished
shard (file, tensors, bytes), and the state its producer needs to go on from the end of the last one (JSON,
and tensors in ``state-0000K.safetensors``). A shard counts as finished only once the manifest names it: a
shard or state file the run was killed while writing (a temp), or wrote but did not record, is removed on
resume and written again; a recorded shard is never rewritten. When OUT is complete, ``OUT.partial`` goes.

    OUT.partial/manifest.json             {"lowbit_partial": 1, "settings": {...}, "shards": [...], "state": ...}
    OUT.partial/shard-00001.safetensors   finished shards, in order
    OUT.partial/state-00002.safetensors   the producer's tensors at the end of the last finished shard

A run holds ``flock`` on the directory while it writes (released by the kernel when the process dies,
SIGKILL included), so a second run on the same OUT is refused instead of writing into the same shards.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from .atomic import atomic_dir, atomic_file, save_tensors, write_errors, write_json

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch

try:
    import fcntl
except ImportError:  # Windows: no lock, as in lowbit.cachedir
    fcntl = None

MANIFEST = "manifest.json"
LAYOUT = 1  # "lowbit_partial": the manifest's layout; another is refused, never guessed at
SUFFIX = ".partial"
# what a partial directory may hold: a later --overwrite deletes these and nothing else. Temps: atomic_file's
# (".NAME.PID_XXXXXXXX.tmp") and safetensors' own, which save_file writes and renames over the name it is given
# (".tmpXXXXXX", the tempfile crate's NamedTempFile: found beside a shard a SIGKILL stopped)
_OURS = re.compile(r"manifest\.json|(shard|state)-\d{5}\.safetensors|\..+\.tmp|\.tmp[A-Za-z0-9]{6}")


@dataclass(frozen=True)
class ProducerState:
    """What the producer of a sharded output needs to go on from a boundary (``ShardWriter.boundary``): a few
    tensors (a calibration's hidden states) and JSON (what it has done so far)."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    info: Any = None


def partial_path(out: str | os.PathLike) -> Path:
    """Where the unfinished ``out`` is written: ``OUT.partial`` beside it."""
    out = Path(os.path.abspath(out))
    return out.with_name(out.name + SUFFIX)


def finished_shards(out: str | os.PathLike) -> int | None:
    """How many finished shards the interrupted run of ``out`` left (0: one that finished none), or None where
    there is no ``OUT.partial``. Reads only: what a command says before it starts."""
    path = partial_path(out)
    if not path.exists():
        return None
    return len(_read(path)["shards"])


def check_leftover(out: str | os.PathLike, *, resume: bool, overwrite: bool) -> int | None:
    """A one-line InputError for an interrupted run's finished shards that this run would neither continue
    (``resume``) nor discard (``overwrite``); else ``finished_shards(out)``."""
    found = finished_shards(out)
    if found and _linked_into(partial_path(out), out):  # killed after its output was complete, before this went
        lock = _lock(partial_path(out))
        try:
            _remove(partial_path(out), strict=False)
        finally:
            _unlock(lock)
        return None
    if found and not resume and not overwrite:
        raise InputError(f"{partial_path(out)} holds {found} finished shards of an interrupted run writing {out}: "
                         "pass --resume to continue it, or --overwrite to discard it")
    return found


class Partial:
    """``OUT.partial``, opened by one run (``Partial.open``) and locked until it is closed. A context manager:
    on the way out, a directory that holds no finished shard is removed (nothing in it is worth a resume)."""

    def __init__(self, directory: Path, manifest: dict, lock: int | None):
        self.directory, self._manifest, self._lock = directory, manifest, lock

    @classmethod
    def open(cls, out: str | os.PathLike, settings: dict[str, Any], *, resume: bool, overwrite: bool) -> Partial:
        """The partial of ``out``: the interrupted run's (``resume``: its settings must be ``settings``, or a
        one-line InputError names the first that differs), or a new one. An interrupted run's finished shards
        are discarded with ``overwrite``, refused without (``check_leftover``); one with none is replaced."""
        path = partial_path(out)
        check_leftover(out, resume=resume, overwrite=overwrite)
        settings = json.loads(json.dumps(settings))  # as the manifest gives them back: lists, not tuples
        if path.exists():
            lock = _lock(path)
            try:
                manifest = _read(path)
                if resume and manifest["shards"]:
                    _check_settings(path, manifest["settings"], settings)
                    _check_shards(path, manifest)
                    return cls(path, manifest, lock)
                _remove(path)
            except BaseException:
                _unlock(lock)
                raise
            _unlock(lock)
        manifest = {"lowbit_partial": LAYOUT, "settings": settings, "shards": [], "state": None}
        lock = None
        try:
            with atomic_dir(path) as tmp:
                write_json(tmp / MANIFEST, manifest)
                lock = _lock(tmp)  # the rename keeps the inode, and so the lock: no other run sees it unlocked
        except BaseException:
            _unlock(lock)
            raise
        return cls(path, manifest, lock)

    def __enter__(self) -> Partial:
        return self

    def __exit__(self, *exc) -> None:
        if self.directory.exists() and not self._manifest["shards"]:
            with suppress(InputError):  # a file someone put there: the directory stays, and the error that ended
                _remove(self.directory)  # the run is the one to report
        self.close()

    def close(self) -> None:
        _unlock(self._lock)
        self._lock = None

    @property
    def shards(self) -> list[dict]:
        """Each finished shard: ``{"file", "tensors" (names, in the order added), "bytes" (of its tensors),
        "size" (of the file)}``."""
        return self._manifest["shards"]

    def path(self, shard: dict) -> Path:
        return self.directory / shard["file"]

    @property
    def stored_bytes(self) -> int:
        """The finished shards' files, in bytes: what the output already holds of the disk it needs."""
        return sum(s["size"] for s in self.shards)

    def state(self) -> ProducerState | None:
        """The producer's state at the end of the last finished shard; None before the first."""
        state = self._manifest["state"]
        if state is None:
            return None
        tensors = {}
        if state["tensors"] is not None:
            from safetensors.torch import load_file

            tensors = load_file(self.directory / state["tensors"])
        return ProducerState(tensors, state["info"])

    def add_shard(self, names: list[str], nbytes: int, write: Callable[[Path], None],
                  state: ProducerState | None) -> Path:
        """The next finished shard, holding tensors ``names`` (``nbytes`` of data) that ``write(path)`` writes,
        with ``state``: the shard, then the state's tensors, then the manifest naming both, each complete on disk
        before the next (a kill between them leaves a shard the manifest does not name, written again on
        resume)."""
        k = len(self.shards) + 1
        path = self.directory / f"shard-{k:05d}.safetensors"
        with write_errors(path), atomic_file(path) as tmp:  # fsynced, then renamed: a kill leaves a temp or the file
            write(tmp)
        held = None
        if state is not None and state.tensors:
            held = f"state-{k:05d}.safetensors"
            _write_tensors(_unshared(state.tensors), self.directory / held)
        _fsync_dir(self.directory)  # the renames above are on disk before the manifest names them
        old = self._manifest["state"]
        shard = {"file": path.name, "tensors": list(names), "bytes": nbytes, "size": path.stat().st_size}
        manifest = {**self._manifest, "shards": [*self.shards, shard],
                    "state": {"info": None if state is None else state.info, "tensors": held}}
        with write_errors(self.directory / MANIFEST):
            write_json(self.directory / MANIFEST, manifest)
        self._manifest = manifest
        if old is not None and old["tensors"] is not None:
            (self.directory / old["tensors"]).unlink(missing_ok=True)
        return path

    def remove(self) -> None:
        """The output is complete: the partial goes (but what someone else put there)."""
        _remove(self.directory, strict=False)
        self.close()


def _write_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    with write_errors(path), atomic_file(path) as tmp:  # fsynced, then renamed: a kill leaves a temp or the file
        save_tensors(tensors, tmp)


def _unshared(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``tensors`` as safetensors stores them: each contiguous, and a copy of any whose memory an earlier one
    shares (safetensors refuses both; +awq gives the layers reading one input one scale tensor)."""
    seen, out = set(), {}
    for name, t in tensors.items():
        t = t.detach().contiguous()
        storage = t.untyped_storage().data_ptr()
        out[name] = t.clone() if storage in seen else t
        seen.add(storage)
    return out


def _read(path: Path) -> dict:
    """``path``'s manifest; a one-line InputError if ``path`` is not a partial lowbit wrote."""
    if not path.is_dir() or path.is_symlink():
        raise InputError(f"{path} is in the way: lowbit writes an unfinished output there; move it")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or "lowbit_partial" not in manifest:
        foreign = _foreign(path)
        if foreign:
            raise InputError(f"{path} is in the way: lowbit writes an unfinished output there, and it holds "
                             f"{foreign[0]}, which lowbit did not write; move it")
        return {"lowbit_partial": LAYOUT, "settings": None, "shards": [], "state": None}  # a run killed at birth
    if manifest["lowbit_partial"] != LAYOUT:
        raise InputError(f"{path} was written by another lowbit (layout {manifest['lowbit_partial']!r}, this one "
                         f"reads {LAYOUT}): pass --overwrite to discard it")
    return manifest


def _linked_into(path: Path, out: str | os.PathLike) -> bool:
    """Whether every finished shard of partial ``path`` is a file of ``out`` too (the hard links ``ShardWriter``
    makes at the end): ``out`` was complete."""
    try:
        held = {(f.stat().st_dev, f.stat().st_ino) for f in Path(out).iterdir() if f.is_file()}
        return all((s.st_dev, s.st_ino) in held
                   for s in ((path / shard["file"]).stat() for shard in _read(path)["shards"]))
    except OSError:
        return False


def _foreign(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not _OURS.fullmatch(p.name) or not p.is_file())


def _remove(path: Path, *, strict: bool = True) -> None:
    """Delete a partial directory, if it holds only what lowbit writes there; else a one-line InputError, or
    (not ``strict``: its output is complete) only lowbit's files, the directory left with the others."""
    foreign = _foreign(path)
    if not foreign:
        shutil.rmtree(path)
    elif strict:
        raise InputError(f"{path} holds {foreign[0]}, which lowbit did not write there; move it, then run again")
    else:
        for p in path.iterdir():
            if p.name not in foreign:
                p.unlink()


def _check_settings(path: Path, then: dict, now: dict) -> None:
    for key in dict.fromkeys([*then, *now]):
        if then.get(key) != now.get(key):
            values = (then.get(key), now.get(key))
            shown = " ".join(str(v) for v in values)
            how = f"{key}: {values[0]} then, {values[1]} now" if len(shown) <= 100 else f"{key} differs"
            raise InputError(f"{path} was written with other settings ({how}): give it those to continue it, or "
                             "drop --resume and pass --overwrite to start over")


def _check_shards(path: Path, manifest: dict) -> None:
    """Every finished shard where the manifest says, of the size written; what no finished shard or state
    names (a temp, a shard written but not recorded) removed."""
    for shard in manifest["shards"]:
        file = path / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["size"]:
            raise InputError(f"{file} is missing or not as it was written: drop --resume and pass --overwrite to "
                             "start over")
    state = manifest["state"]
    kept = {MANIFEST, *(s["file"] for s in manifest["shards"]), *([state["tensors"]] if state["tensors"] else [])}
    for p in path.iterdir():
        if p.name not in kept and _OURS.fullmatch(p.name):
            p.unlink()


def _lock(path: Path) -> int | None:
    """An exclusive ``flock`` on directory ``path``, held by the returned descriptor; a one-line InputError if
    another process holds it."""
    if fcntl is None:
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise InputError(f"another lowbit run is writing {path} now: wait for it to finish, or stop it") from None
    return fd


def _unlock(fd: int | None) -> None:
    if fd is not None:
        os.close(fd)  # closing the descriptor releases its flock


def _fsync_dir(path: Path) -> None:
    with suppress(OSError):  # not every filesystem fsyncs a directory; the renames stand without it
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
