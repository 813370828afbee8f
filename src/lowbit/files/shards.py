"""Tensors written to safetensors shards as they are made, so that a model is never held whole to be saved.

The layout is transformers' (``save_pretrained``): one ``model.safetensors`` when everything fits one shard (the
same bytes ``save_tensors`` writes for the same tensors: safetensors orders a file by dtype and name, not by
insertion), else ``model-0000N-of-0000M.safetensors`` with ``model.safetensors.index.json`` mapping each tensor to
its shard. A shard is written once full; M is known only at the end, so shards are renamed then (inside the
output's temp directory: ``lowbit.files.atomic.atomic_dir`` makes the whole output appear at once).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import chmod_as_new, save_tensors

if TYPE_CHECKING:
    import torch

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# transformers' default max_shard_size is "5GB"; lowbit holds one shard in memory while it fills, so a smaller one
# keeps that cost well under a large model's float weights
SHARD_BYTES = 1 << 30


class ShardWriter:
    """``add(name, tensor)`` in any order, then ``close()``. At most one shard's tensors (``max_bytes``, or one
    tensor larger than that) are held at a time."""

    def __init__(self, directory: Path, max_bytes: int = SHARD_BYTES):
        self.directory, self.max_bytes = Path(directory), max_bytes
        self._held: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # each full shard's temp file and names
        self.total = 0  # bytes of every tensor added

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._held and self._bytes + nbytes > self.max_bytes:
            self._flush()
        self._held[name] = tensor.contiguous()
        self._bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._written) + 1}.safetensors"
        save_tensors(self._held, path)
        self._written.append((path, list(self._held)))
        self._held, self._bytes = {}, 0

    def close(self) -> list[str]:
        """Write what is held; returns the names of the files written (shards, and the index if any)."""
        if not self._written:
            save_tensors(self._held, self.directory / SINGLE)
            self._held = {}
            return [SINGLE]
        if self._held:
            self._flush()
        count, weight_map = len(self._written), {}
        for i, (path, names) in enumerate(self._written, start=1):
            final = f"model-{i:05d}-of-{count:05d}.safetensors"
            os.replace(path, self.directory / final)
            weight_map.update(dict.fromkeys(names, final))
        index = self.directory / INDEX
        index.write_text(json.dumps({"metadata": {"total_size": self.total},
                                     "weight_map": dict(sorted(weight_map.items()))}, indent=2) + "\n")
        chmod_as_new(index)
        return [*sorted(set(weight_map.values())), INDEX]
