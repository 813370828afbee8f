"""Tensors parked on disk until a safetensors file of them is written, so a filling shard costs disk, not memory.

A safetensors file starts with a header giving every tensor's offsets, and the data is ordered by dtype, then
name, so a shard can be written only once all its tensors are known. ``Spill`` appends each tensor's bytes to a
file as it comes and then writes the shard from that file, a chunk at a time, with the bytes
``safetensors.torch.save_file`` writes for the same tensors: ``header`` is the library's own serialization
(``prepare`` and ``impl Serialize for Metadata`` in safetensors/src/tensor.rs, version 0.8): tensors sorted by
the ``Dtype`` enum's order descending, then by name; compact JSON with ``__metadata__`` first; spaces to a
multiple of 8 bytes; its length before it as a little-endian u64.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# safetensors' Dtype enum, in its declaration order (the order ``prepare`` sorts by)
_ENUM = ("BOOL", "F4", "F6_E2M3", "F6_E3M2", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F8_E4M3FNUZ",
         "F8_E5M2FNUZ", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "C64", "F64", "I64", "U64")
_RANK = {name: i for i, name in enumerate(_ENUM)}
_CHUNK = 64 << 20  # bytes copied at a time: the memory a shard's writing costs
_ALIGN = 8  # safetensors' N_LEN: the header is padded to it


def safetensors_name(dtype: torch.dtype) -> str:
    """safetensors' name for a torch dtype (a header's ``dtype``); KeyError for one it has none for."""
    import torch

    names = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
             torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
             torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
             torch.complex64: "C64", torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
    return names[dtype]


@dataclass(frozen=True)
class Entry:
    dtype: str  # safetensors' name for it
    shape: tuple[int, ...]
    offset: int  # in the spill file
    nbytes: int


def header(entries: dict[str, Entry], metadata: dict[str, str] | None) -> tuple[bytes, list[str]]:
    """A safetensors file's first bytes for ``entries``, and the order their data follows in."""
    order = sorted(entries, key=lambda name: (-_RANK[entries[name].dtype], name.encode()))
    fields: dict[str, object] = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for name in order:
        e = entries[name]
        fields[name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    text = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text, order


class Spill:
    """``add`` tensors, ``write`` some of them as a safetensors file, ``keep`` the rest; ``close`` removes the
    spill file (which lives in ``directory``: the output's own temp directory, removed with it on failure)."""

    def __init__(self, directory: Path):
        self.path = Path(directory) / ".spill"
        self._file = open(self.path, "w+b")  # noqa: SIM115 - held open while the writer lives
        self.entries: dict[str, Entry] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        import torch

        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        self._file.seek(0, os.SEEK_END)
        offset = self._file.tell()
        self._file.write(memoryview(data))
        self.entries[name] = Entry(safetensors_name(tensor.dtype), tuple(tensor.shape), offset, data.nbytes)

    def write(self, names: list[str], path: Path, metadata: dict[str, str] | None = None) -> None:
        """``names`` as a safetensors file at ``path``."""
        first, order = header({name: self.entries[name] for name in names}, metadata)
        self._file.flush()
        source = self._file.fileno()
        with open(path, "wb") as out:
            out.write(first)
            for name in order:
                e = self.entries[name]
                _copy(source, e.offset, e.nbytes, out)

    def keep(self, names: list[str]) -> None:
        """Forget every tensor but ``names``, whose bytes move to a new spill file (the old one's space is freed)."""
        self._file.flush()
        old, self._file = self._file, open(self.path.with_name(".spill-next"), "w+b")  # noqa: SIM115
        kept = {}
        for name in names:
            e = self.entries[name]
            kept[name] = Entry(e.dtype, e.shape, self._file.tell(), e.nbytes)
            _copy(old.fileno(), e.offset, e.nbytes, self._file)
        old.close()
        os.replace(self._file.name, self.path)
        self.entries = kept

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def _copy(source: int, offset: int, count: int, out) -> None:
    end = offset + count
    while offset < end:
        chunk = os.pread(source, min(_CHUNK, end - offset), offset)
        if not chunk:
            raise OSError(f"spill file ended {end - offset} bytes early")
        out.write(chunk)
        offset += len(chunk)
