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
_MAX_DIMS = 4  # ggml.h GGML_MAX_DIMS; llama.cpp's gguf.cpp refuses more
_MAX_ELEMENTS = (1 << 63) - 1  # gguf.cpp: a tensor's element count must fit int64_t
# Bounds on what gguf-py's reader turns into Python objects one by one (each key, tensor and string is a few
# numpy views): far above real files (SmolLM2: 38 keys, 272 tensors, 49,152-token vocabulary; the largest
# vocabularies, Gemma 3's, hold 262,144 tokens), far below a count that exhausts memory.
_MAX_KVS, _MAX_TENSORS, _MAX_ARRAY_OBJECTS = 1 << 16, 1 << 16, 1 << 21


class _Unreadable(Exception):
    """Not something this check can judge (a GGUF version it does not know); the loader decides."""


class _Refused(Exception):
    """The header declares something no reader should take (the message says what)."""


class _Cut(struct.error):
    """The header declares more bytes than the file has left (the message says what and where)."""


def check_complete(path: str | Path) -> None:
    """Raise ``ModelLoadError`` if ``path``'s GGUF header declares what the file cannot hold: counts,
    string and array lengths past the end of the file or beyond the reader's bounds, more than 4
    dimensions, an unknown tensor type, tensor data outside the file, misaligned or overlapping.
    Judged from the header alone, reading it in place (mmap) and allocating nothing of the declared sizes.

    Files that are not GGUF v2/v3 at all are left to the loader to refuse.
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
        except struct.error as e:  # a count or length past the end: a cut file, or a crafted one
            detail = f": {e}" if isinstance(e, _Cut) else ""
            raise ModelLoadError(f"not a complete GGUF file: {path} ({size} bytes; it ends inside the "
                                 f"{reader.section}{detail})") from None
        except _Refused as e:
            raise ModelLoadError(f"not a valid GGUF file: {path} ({size} bytes): its {reader.section} {e}") from None
        except _Unreadable:
            return
    if size < need:
        raise ModelLoadError(f"not a complete GGUF file: {path} ({size} bytes; its tensor table needs {need})")


def _bytes_needed(reader: _Reader) -> int:
    """The file size the header implies."""
    version, tensors, kvs = reader.unpack("<IQQ")
    if version not in (2, 3):  # v1 counted in 32 bits; the loader reads or refuses it
        raise _Unreadable
    # a count the rest of the file cannot hold ends the loops below at its end (struct.error)
    _bound(kvs, _MAX_KVS, "metadata keys")
    _bound(tensors, _MAX_TENSORS, "tensors")
    alignment = _DEFAULT_ALIGNMENT
    reader.section = "metadata"
    for _ in range(kvs):
        key = reader.string()
        (kind,) = reader.unpack("<I")
        value = reader.value(kind)
        if key == b"general.alignment" and kind == _UINT32:
            alignment = value
    if alignment <= 0 or alignment & (alignment - 1):  # gguf.cpp: "alignment must be a non-zero power of 2"
        raise _Refused(f"sets general.alignment {alignment}, not a power of 2")
    reader.section = "tensor table"
    spans = []
    for _ in range(tensors):
        name = reader.string(keep=True)
        (dims,) = reader.unpack("<I")
        if dims > _MAX_DIMS:
            raise _Refused(f"gives tensor {_show(name)} {dims} dimensions (ggml has at most {_MAX_DIMS})")
        shape = reader.unpack(f"<{dims}Q")
        ggml_type, offset = reader.unpack("<IQ")
        elements = prod(shape)  # an exact integer: a 10^12-element tensor is a number, never an allocation
        if elements > _MAX_ELEMENTS:
            raise _Refused(f"gives tensor {_show(name)} {elements:,} elements (more than int64 counts)")
        if offset % alignment:
            raise _Refused(f"puts tensor {_show(name)} at data offset {offset:,}, not a multiple of {alignment}")
        spans.append((offset, offset + _nbytes(ggml_type, elements, name), name))
    data_start = -(-reader.pos // alignment) * alignment  # the next multiple of the alignment
    spans.sort()
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:], strict=False):
        if begin < end:
            raise _Refused(f"overlaps tensor {_show(second)} with {_show(first)} (data bytes {begin:,} to {end:,})")
    return data_start + max((end for _, end, _ in spans), default=0)


def _bound(n: int, most: int, what: str) -> None:
    if n > most:
        raise _Refused(f"declares {n:,} {what}; lowbit reads at most {most:,}")


def _show(name: bytes) -> str:
    return repr(name[:80].decode("utf-8", "replace"))


def _nbytes(ggml_type: int, elements: int, name: bytes) -> int:
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        raise _Refused(f"gives tensor {_show(name)} the unknown ggml type {ggml_type}") from None
    if elements % block:
        raise _Refused(f"gives tensor {_show(name)} {elements:,} elements, not whole blocks of {block}")
    return elements // block * type_size


class _Reader:
    """A cursor over the mapped file; reading past its end raises ``struct.error``."""

    def __init__(self, blob):
        self.blob, self.pos, self.section = blob, 4, "header"
        self.objects = 0  # strings and arrays inside arrays so far: what gguf-py makes one by one

    def unpack(self, fmt: str) -> tuple:
        values = struct.unpack_from(fmt, self.blob, self.pos)
        self.pos += struct.calcsize(fmt)
        return values

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.blob):
            raise _Cut(f"{n:,} bytes declared at byte {self.pos:,}")
        self.pos += n

    def string(self, keep: bool = False) -> bytes:
        (n,) = self.unpack("<Q")
        start = self.pos
        self.skip(n)
        return self.blob[start:self.pos] if n <= 64 or (keep and n <= 4096) else b""  # only short ones are used

    def value(self, kind: int):
        if kind in _WIDTH:
            return self.unpack({1: "<B", 2: "<H", 4: "<I", 8: "<Q"}[_WIDTH[kind]])[0]
        if kind == _STRING:
            return self.string()
        if kind != _ARRAY:
            raise _Refused(f"holds a value of unknown type {kind}")
        element, count = self.unpack("<IQ")
        if element in _WIDTH:
            self.skip(_WIDTH[element] * count)
        elif element in (_STRING, _ARRAY):
            self.objects += count
            _bound(self.objects, _MAX_ARRAY_OBJECTS, "strings and arrays inside arrays")
            for _ in range(count):
                self.value(element)
        else:
            raise _Refused(f"holds an array of unknown type {element}")
        return None
