"""GGUF files converted once: float32 safetensors, config and tokenizer in the lowbit cache.

transformers converts a GGUF file by dequantizing every tensor (~20 s for the embedded
SmolLM2-135M); reading the same float32 weights back from safetensors takes a fraction of a
second. The cache directory is ``cache_dir()/model-<first 32 hex of the GGUF's sha256>``:

    model.safetensors     the converted state dict, float32, a tied tensor stored once
    config.json, generation_config.json, tokenizer files   (save_pretrained)
    lowbit-cache.json     what it was made from, by which transformers, and each file's size and sha256

It is used only if every recorded file is there with its size and sha256 and the transformers
version matches (another converter may give other weights). Anything else is a one-line
``CacheWarning`` and a fresh conversion; a cache that cannot be written is a warning too, never
a failed load. The sha256 of each file is ``hashing.file_sha256``'s: read once, then recorded with
its size, mtime, ctime and inode, and read again when any of them changes. Reading every file on
every use cost ~0.4 s for SmolLM2's ~540 MB but ~20 s for the 32 GB an 8B model converts to, and
anything that writes a file through the file system changes its ctime; damage that bypasses it
(a failing disk) is found by ``--verify`` (``verify=True``), which reads them all.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from datetime import datetime, timezone
from pathlib import Path

from ..cachedir import cache_dir, writable_root, writing
from ..files.atomic import atomic_dir, save_tensors
from .architectures import with_architectures
from .hashing import file_sha256, read_sha256

META = "lowbit-cache.json"
WEIGHTS = "model.safetensors"
_SPARE_BYTES = 256 << 20  # leave the disk this much beyond the cache itself


_EVERY = 10.0  # seconds between "still converting" lines: a log shows the run is alive (SmolLM2 takes ~20 s)


@contextmanager
def announced(what: str) -> Iterator[None]:
    """Progress lines for a long step when stderr is no terminal (a log, a pipe): one as it starts,
    one every ``_EVERY`` seconds, one with its time when it ends. A terminal shows the caller's spinner."""
    # sys.__stderr__, not sys.stderr: commands.common.load holds sys.stderr during a load to hide
    # transformers' tqdm bar, and these lines are the ones the log should keep
    stream = sys.__stderr__
    if stream is None or stream.isatty():
        yield
        return

    def say(line: str) -> None:
        stream.write(f"lowbit: {line}\n")  # the prefix of lowbit.progress.note's lines
        stream.flush()

    start, done = time.monotonic(), threading.Event()

    def beat() -> None:
        while not done.wait(_EVERY):
            say(f"{what}: {time.monotonic() - start:.0f} s so far")

    say(f"{what} ...")
    ticker = threading.Thread(target=beat, daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
    say(f"{what}: done in {time.monotonic() - start:.1f} s")


class CacheWarning(UserWarning):
    """The converted-model cache was not used or not written; the load itself went on."""


def notice(message: str) -> None:
    warnings.warn(message, CacheWarning, stacklevel=3)


def cache_path(sha256: str) -> Path:
    return cache_dir() / f"model-{sha256[:32]}"


def lookup(sha256: str, *, quiet: bool = False, verify: bool = False) -> Path | None:
    """The verified cache directory of the GGUF file with this sha256, or None to convert it
    (with a notice, unless ``quiet``, when a directory exists but cannot be trusted). ``verify``:
    read each of its files for its sha256, whatever the recorded hash says."""
    path = cache_path(sha256)
    if not path.exists():
        return None
    try:
        problem = _problem(path, sha256, verify)
    except OSError as exc:
        problem = f"cannot be read ({type(exc).__name__}: {exc.strerror or exc})"
    if problem:
        if quiet:
            return None
        notice(f"converted-model cache {path} {problem}; converting the GGUF file again")
        return None
    with suppress(OSError):  # a read-only cache still serves
        os.utime(path / META)  # its mtime is the entry's last use, for `lowbit cache clear --older-than`
    return path


def _problem(path: Path, sha256: str, verify: bool) -> str | None:
    """Why the directory at ``path`` is not a cache of this GGUF file, or None if it is."""
    try:
        meta = json.loads((path / META).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"has no readable {META} ({type(exc).__name__})"
    files, sizes = (meta.get("files"), meta.get("sizes")) if isinstance(meta, dict) else (None, None)
    if not isinstance(files, dict) or not isinstance(sizes, dict) or set(files) != set(sizes) \
            or WEIGHTS not in files or meta.get("kind") != "model":
        return f"has a malformed {META}"
    if meta.get("source_sha256") != sha256:
        return f"was made from another file (sha256 {str(meta.get('source_sha256'))[:16]}...)"
    if meta.get("transformers") != _transformers_version():
        return f"was converted by transformers {meta.get('transformers')}, this is {_transformers_version()}"
    present = {p.name for p in path.iterdir()} - {META}
    if present != set(files):
        return f"holds {sorted(present ^ set(files))}, which {META} does not match"
    for name in sorted(files):
        size = (path / name).stat().st_size
        if size != sizes[name]:
            return f"has {name} of {size} bytes, {sizes[name]} expected"
    for name in sorted(files):
        if file_sha256(path / name, verify=verify) != files[name]:
            return f"has a changed {name} (sha256 differs)"
    return None


def store(model, tokenizer, *, source: Path, sha256: str, name: str) -> None:
    """Write ``model`` (converted from the GGUF file ``source``) and ``tokenizer`` to the cache,
    atomically; on any failure, a notice, and the next run converts again."""
    path = cache_path(sha256)
    try:
        tensors = _state_dict(model)
        writable_root()  # also sweeps a killed conversion's 540 MB temp directory before the free-space check
        need = sum(t.numel() * t.element_size() for t in tensors.values()) + _SPARE_BYTES
        free = shutil.disk_usage(path.parent).free
        if free < need:
            raise OSError(f"{free >> 20} MiB free, {need >> 20} MiB needed")
        with writing(path.parent), atomic_dir(path, overwrite=True) as tmp:  # the lock: no sweep meanwhile
            _write(tmp, model, tokenizer, tensors)
            # read_sha256: a record would name the temp directory, about to be renamed
            files = {p.name: read_sha256(p) for p in sorted(tmp.iterdir())}
            meta = {"kind": "model", "model": name, "source": str(source), "source_sha256": sha256,
                    "transformers": _transformers_version(),
                    "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                    "files": files, "sizes": {n: (tmp / n).stat().st_size for n in files}}
            (tmp / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    except Exception as exc:  # the model is loaded; a cache we cannot write must not fail the run
        first = next(iter(str(exc).strip().splitlines()), "")
        notice(f"cannot cache the converted model in {path.parent} ({type(exc).__name__}: {first[:200]}); "
               "the next run converts the GGUF file again")


def _state_dict(model) -> dict:
    """The float32 state dict, each tensor once: safetensors refuses shared storage, and
    from_pretrained re-ties what the config says is tied (SmolLM2's lm_head.weight)."""
    first: dict[tuple, str] = {}
    tensors = {}
    for key, t in model.state_dict().items():
        where = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if where in first:
            continue
        first[where] = key
        tensors[key] = t.detach().contiguous()
    return tensors


def _write(directory: Path, model, tokenizer, tensors: dict) -> None:
    save_tensors(tensors, directory / WEIGHTS)
    with_architectures(model).save_pretrained(directory)  # plain float32: no GGUF quantization_config
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
