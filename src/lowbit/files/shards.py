"""Tensors written to safetensors shards as they are made, so that a model is never held whole to be saved.

The layout is transformers' (``save_pretrained``): one ``model.safetensors`` when everything fits one shard (the
same bytes ``save_tensors`` writes for the same tensors: safetensors orders a file by dtype and name, not by
insertion), else ``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json`` mapping each tensor to
its shard. A shard is written once full; M is known only at the end, so shards are renamed then (inside the
output's temp directory: ``lowbit.files.atomic.atomic_dir`` makes the whole output appear at once), or, for a run
that can be resumed, written to ``OUT.partial`` (``lowbit.files.partial``) and linked into the output at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import InputError
from .atomic import chmod_as_new, save_tensors

if TYPE_CHECKING:
    import torch

    from .partial import Partial, ProducerState

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# transformers' default max_shard_size is "5GB"; lowbit holds one shard in memory while it fills, so a smaller one
# keeps that cost well under a large model's float weights
SHARD_BYTES = 1 << 30


class ShardWriter:
    """``add(name, tensor)`` in any order, then ``close()``. At most one shard's tensors (``max_bytes``, or one
    tensor larger than that) are held at a time.

    A shard ends where a tensor would take it past ``max_bytes``: after any tensor, or, with ``boundaries``,
    only where the producer said one may (``boundary(state)``: after a whole transformer block, say), the
    tensors added since then held for the next shard. With ``partial`` (``lowbit.files.partial``) each shard
    is written there once full, with the producer's state at its end, and a killed run goes on from the last:
    ``resumed`` is that state, ``finished`` the names the finished shards hold (``add`` skips them), and
    ``close`` links the shards into ``directory``. The shards end where an uninterrupted run ends them, so
    the bytes are the same. A state is saved only when a shard ends at its boundary, and must not change after
    it is given; the last shard (at ``close``) is saved with the state of a boundary after the last tensor."""

    def __init__(self, directory: Path, max_bytes: int = SHARD_BYTES, *, partial: Partial | None = None,
                 boundaries: bool = False):
        self.directory, self.max_bytes, self.partial, self.boundaries = Path(directory), max_bytes, partial, boundaries
        self._held: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._cut, self._state = 0, None  # tensors held before the last boundary, and the state given there
        self._written: list[tuple[Path, list[str]]] = []  # each finished shard's file and names
        self.total = 0  # bytes of every tensor added
        self.resumed: ProducerState | None = None
        self._where: dict[str, Path] = {}  # a finished shard's tensor -> its file
        if partial is not None:
            for shard in partial.shards:
                self._written.append((partial.path(shard), shard["tensors"]))
                self._where.update(dict.fromkeys(shard["tensors"], partial.path(shard)))
                self.total += shard["bytes"]
            self.resumed = self._state = partial.state()

    @property
    def finished(self) -> Collection[str]:
        """The tensors finished shards hold: a resumed producer need not make them again."""
        return self._where.keys()

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._where:  # made again by a resumed producer (a layer a shard ended inside)
            self._check_finished(name, tensor)
            return
        nbytes = tensor.numel() * tensor.element_size()
        cut = self._cut if self.boundaries else len(self._held)
        if cut and self._bytes + nbytes > self.max_bytes:
            self._flush(cut)
        self._held[name] = tensor.contiguous()
        self._bytes += nbytes
        self.total += nbytes

    def boundary(self, state: ProducerState | None = None) -> None:
        """A shard may end after the tensors added so far; ``state``: what the producer needs to go on from
        here, saved with the shard that ends here (and given back as ``resumed``)."""
        self._cut, self._state = len(self._held), state

    def _flush(self, count: int) -> None:
        names = list(self._held)[:count]
        shard = {name: self._held.pop(name) for name in names}
        self._bytes -= sum(t.numel() * t.element_size() for t in shard.values())
        self._cut = 0  # what is still held was added after the boundary the shard ended at
        if self.partial is None:
            path = self.directory / f".shard-{len(self._written) + 1}.safetensors"
            save_tensors(shard, path)
        else:
            path = self.partial.add_shard(shard, self._state)
        self._written.append((path, names))

    def _check_finished(self, name: str, tensor: torch.Tensor) -> None:
        """A tensor made again must be the one a finished shard holds: its producer was stopped inside what it
        makes at once (a layer's parts) and made it all again; different bytes (the rounding is not
        reproduced here) would mix two runs in one file."""
        import torch
        from safetensors import safe_open

        with safe_open(self._where[name], "pt") as f:
            stored = f.get_tensor(name)
        if stored.dtype != tensor.dtype or stored.shape != tensor.shape or \
                not torch.equal(_raw(stored), _raw(tensor)):
            raise InputError(f"{name} made now differs from what {self._where[name]} holds: the interrupted run's "
                             "result is not reproduced here (another torch build or machine?); drop --resume and "
                             "pass --overwrite to start over")

    def close(self) -> list[str]:
        """Write what is held; returns the names of the files written (shards, and the index if any)."""
        if self._held or not self._written:  # the end is a boundary: the last shard, or the only one
            self._flush(len(self._held))
        count, weight_map = len(self._written), {}
        if count == 1:
            self._place(self._written[0][0], SINGLE)
            return [SINGLE]
        for i, (path, names) in enumerate(self._written, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            self._place(path, final)
            weight_map.update(dict.fromkeys(names, final))
        index = self.directory / INDEX
        index.write_text(json.dumps({"metadata": {"total_size": self.total},
                                     "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        chmod_as_new(index)
        return [*sorted(set(weight_map.values())), INDEX]

    def _place(self, path: Path, name: str) -> None:
        """A finished shard into the output as ``name``: renamed; from a partial, linked (the partial keeps it
        until the output is complete), or copied where the filesystem has no hard links."""
        target = self.directory / name
        if self.partial is None:
            os.replace(path, target)
            return
        try:
            os.link(path, target)
        except OSError:  # FAT and some network filesystems: EPERM, ENOTSUP
            shutil.copyfile(path, target)
            chmod_as_new(target)


def _raw(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes, compared as bytes: NaN scales equal themselves."""
    import torch

    return t.contiguous().reshape(-1).view(torch.uint8)
