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
from .atomic import chmod_as_new
from .spill import Spill

if TYPE_CHECKING:
    import torch

    from .partial import Partial, ProducerState

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# transformers' default max_shard_size is "5GB"; a filling shard waits on disk (``lowbit.files.spill``), and a
# smaller one keeps that disk and the time to copy it into the shard small beside a large model's
SHARD_BYTES = 1 << 30
METADATA = {"format": "pt"}  # what transformers' save_pretrained (and so safetensors.torch.save_file here) writes


class ShardWriter:
    """``add(name, tensor)`` in any order, then ``close()``. The tensors of the shard that is filling
    (``max_bytes``, or one tensor larger than that) wait in a spill file in ``directory``, not in memory.

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
        self._spill = Spill(self.directory)
        self._held: list[str] = []  # in the spill, in the order added
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
        if name in self._spill.entries:
            raise ValueError(f"{name} added twice")
        self._spill.add(name, tensor)
        self._held.append(name)
        self._bytes += nbytes
        self.total += nbytes

    def boundary(self, state: ProducerState | None = None) -> None:
        """A shard may end after the tensors added so far; ``state``: what the producer needs to go on from
        here, saved with the shard that ends here (and given back as ``resumed``)."""
        self._cut, self._state = len(self._held), state

    def _flush(self, count: int) -> None:
        names, self._held = self._held[:count], self._held[count:]
        nbytes = sum(self._spill.entries[name].nbytes for name in names)
        self._bytes -= nbytes
        self._cut = 0  # what is still held was added after the boundary the shard ended at

        def write(path: Path) -> None:
            self._spill.write(names, path, METADATA)
            chmod_as_new(path)

        if self.partial is None:
            path = self.directory / f".shard-{len(self._written) + 1}.safetensors"
            write(path)
        else:
            path = self.partial.add_shard(names, nbytes, write, self._state)
        self._spill.keep(self._held)
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
        self._spill.close()
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
