"""Is a .gguf file whole? Its header says how many bytes it must have; a cut file is refused
in one line before transformers reads it (its reader fails with struct's "unpack_from requires
a buffer of N bytes", which names neither the file nor the problem).

Layout, from the GGUF spec (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):
magic "GGUF", u32 version, u64 tensor count, u64 metadata count; then the metadata
(key string, u32 value type, value); then per tensor: name string, u32 dims, u64 x dims,
u32 ggml type, u64 offset into the data section; the data section starts at the next
multiple of ``general.alignment`` (default 32). A string is a u64 length and its bytes.
"""

from __future__ import annotations

import mmap
import struct
from math import prod
from pathlib import Path

from ..errors import ModelLoadError

# metadata value types with a fixed width: u8 i8 u16 i16 u32 i32 f32 bool u64 i64 f64 (the spec's gguf_type)
_WIDTH = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_DEFAULT_ALIGNMENT = 32  # the spec's GGUF_DEFAULT_ALIGNMENT


class _Unreadable(Exception):
    """Not something this check can judge (a type it does not know); the loader decides."""


def check_complete(path: str | Path) -> None:
    """Raise ``ModelLoadError`` if ``path`` is shorter than its GGUF header says it must be.

    Files that are not GGUF v2/v3 at all, or hold types gguf-py does not know, are left to
    the loader to refuse: this check only answers "was the file cut short?".
    """
    path = Path(path)
    size = path.stat().st_size
    if size == 0:
        raise ModelLoadError(f"not a complete GGUF file: {path} (it is empty)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as blob:
        if blob[:4] != b"GGUF":
            if size < 4 and b"GGUF".startswith(blob[:]):
                raise ModelLoadError(f"not a complete GGUF file: {path} ({size} bytes; it ends inside the header)")
            return
        reader = _Reader(blob)
        try:
            need = _bytes_needed(reader)
        except struct.error:
            raise ModelLoadError(f"not a complete GGUF file: {path} ({size} bytes; it ends inside the "
                                 f"{reader.section})") from None
        except _Unreadable:
            return
    if size < need:
        raise ModelLoadError(f"not a complete GGUF file: {path} ({size} bytes; its tensor table needs {need})")


def _bytes_needed(reader: _Reader) -> int:
    """The file size the header implies."""
    version, tensors, kvs = reader.unpack("<IQQ")
    if version not in (2, 3):  # v1 counted in 32 bits; the loader reads or refuses it
        raise _Unreadable
    alignment = _DEFAULT_ALIGNMENT
    reader.section = "metadata"
    for _ in range(kvs):
        key = reader.string()
        (kind,) = reader.unpack("<I")
        value = reader.value(kind)
        if key == b"general.alignment" and kind == _UINT32:
            alignment = value
    reader.section = "tensor table"
    ends = []
    for _ in range(tensors):
        reader.string()
        (dims,) = reader.unpack("<I")
        shape = reader.unpack(f"<{dims}Q")
        ggml_type, offset = reader.unpack("<IQ")
        ends.append(offset + _nbytes(ggml_type, prod(shape)))
    data_start = -(-reader.pos // alignment) * alignment  # the next multiple of the alignment
    return data_start + max(ends, default=0)


def _nbytes(ggml_type: int, elements: int) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise _Unreadable from None
    return elements // block * type_size


class _Reader:
    """A cursor over the mapped file; reading past its end raises ``struct.error``."""

    def __init__(self, blob):
        self.blob, self.pos, self.section = blob, 4, "header"

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.blob):
            raise struct.error(f"{n} bytes past the end")
        self.pos += n

    def string(self) -> bytes:
        (n,) = self.unpack("<Q")
        start = self.pos
        self.skip(n)
        return self.blob[start:self.pos] if n <= 64 else b""  # only short keys are ever compared

    def value(self, kind: int):
        if kind in _WIDTH:
            return self.unpack({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_WIDTH[kind]])[0]
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise _Unreadable
        element, count = self.unpack("<IQ")
        if element in _WIDTH:
            self.skip(_WIDTH[element] * count)
        else:
            for _ in range(count):
                self.value(element)
        return None
