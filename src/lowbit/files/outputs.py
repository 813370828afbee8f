"""Where a command may write: never over one of its inputs, never inside lowbit's cache.

Paths are compared by what they are, not by how they are spelled: by their real path (symbolic links
and ``..`` resolved) and by identity (device and inode), so ``m``, ``./m``, ``d/../m``, a symbolic link
to ``m``, a hard link to ``m``'s file and a bind mount of ``m``'s directory are all ``m``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..cachedir import cache_dir, is_entry
from ..errors import InputError

PathLike = str | os.PathLike


def _identity(path: PathLike) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except (OSError, ValueError):  # ValueError: a NUL in the name
        return None
    return st.st_dev, st.st_ino


def _ancestors(path: PathLike) -> list[tuple[int, int]]:
    """The identities of every existing directory above ``path``'s real path, nearest first."""
    real = Path(os.path.realpath(path))
    found = (_identity(p) for p in real.parents)
    return [i for i in found if i is not None]


def _within(inner: PathLike, outer: PathLike) -> bool:
    """Whether ``inner`` is ``outer`` or lies below it (a path that does not exist yet by name; else by identity)."""
    a, b = os.path.realpath(inner), os.path.realpath(outer)
    if a == b or a.startswith(b.rstrip(os.sep) + os.sep):
        return True
    outer_id = _identity(outer)
    return outer_id is not None and (_identity(inner) == outer_id or outer_id in _ancestors(inner))


def check_not_input(output: PathLike | None, inputs: Iterable[PathLike | None], *, what: str = "output") -> None:
    """A one-line ``InputError`` if ``output`` is one of ``inputs``, lies inside an input directory, or (a
    directory about to be replaced) holds an input. ``None`` entries (an option not given) are skipped."""
    if output is None:
        return
    for given in inputs:
        if given is None or not os.path.exists(given):
            continue
        if _within(output, given):
            how = "is" if _within(given, output) else "lies inside"
        elif os.path.isdir(output) and _within(given, output):
            how = "holds"
        else:
            continue
        raise InputError(f"{what} {output} {how} the input {given}: lowbit never writes over what it reads; "
                         "name another path")


def check_outputs(outputs: Iterable[PathLike | None], inputs: Iterable[PathLike | None]) -> None:
    """``check_not_input`` for each output, against the inputs and the outputs named before it
    (``--json r.html --report r.html`` would write one file over the other)."""
    inputs, seen = list(inputs), []
    for output in outputs:
        if output is None:
            continue
        check_not_input(output, inputs)
        for earlier in seen:
            if _within(output, earlier) and _within(earlier, output):
                raise InputError(f"{earlier} is named for two outputs; give each its own file")
        seen.append(output)


def check_outside_cache(path: PathLike) -> None:
    """A one-line ``InputError`` if ``path`` lies inside lowbit's cache, is it, or holds it: the cache's
    housekeeping (``lowbit cache clear``, the sweep of dead runs' temps, rebuilt entries) deletes what
    is there. The cache's own entries (``cachedir.ENTRY`` names directly in its root) are what it writes."""
    root = cache_dir()
    p = Path(os.path.abspath(path))
    if is_entry(p.name) and _within(p.parent, root) and _within(root, p.parent):
        return
    if _within(p, root):
        raise InputError(f"output {path} lies inside lowbit's cache {root}, whose housekeeping deletes what is "
                         "there; name a path outside it")
    if os.path.isdir(p) and _within(root, p):
        raise InputError(f"output {path} holds lowbit's cache {root}; name another path")
