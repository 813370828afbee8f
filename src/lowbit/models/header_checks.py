"""A safetensors file checked from its header alone, before any library reads it: a crafted header
(a length past the end of the file, absurd shapes, offsets that overlap or leave the file) is refused
in one line, and nothing larger than the header itself is ever read or allocated.

Layout (https://github.com/huggingface/safetensors, README "Format"): u64 little-endian N, then N bytes
of JSON: {"__metadata__": {str: str}, name: {"dtype", "shape", "data_offsets": [begin, end]}, ...},
then the data; offsets count from the end of the header and the tensors fill the data exactly, one
after another (the library's ``validate`` refuses gaps and overlaps the same way).
"""

from __future__ import annotations

import json
import struct
from math import prod
from pathlib import Path
from typing import NamedTuple

from ..errors import ModelLoadError

# safetensors' own limit on N (src/tensor.rs MAX_HEADER_SIZE): a larger header is not a safetensors file
MAX_HEADER_BYTES = 100_000_000
# bits per element of each dtype safetensors 0.8 knows (src/tensor.rs Dtype::bitsize)
DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
              "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
              "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}


class Header(NamedTuple):
    """A tensor as its file's header describes it."""
    dtype: str  # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]


def check_safetensors(path: str | Path) -> dict[str, Header]:
    """Each tensor's dtype and shape, by name, if ``path``'s header is sound: its length within the file and the cap,
    valid JSON, each tensor's dtype known, its shape of whole numbers whose bytes equal its offsets'
    span, and the spans tiling the data exactly. Else ModelLoadError, one line naming the file and the problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _Bad(f"{size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > min(MAX_HEADER_BYTES, size - 8):
                raise _Bad(f"its header declares {n:,} bytes; the file holds {size - 8:,} after the length field"
                           + (f" and safetensors reads at most {MAX_HEADER_BYTES:,}" if n > MAX_HEADER_BYTES else ""))
            header = f.read(n)
        return _check_header(header, size - 8 - n)
    except _Bad as e:
        raise ModelLoadError(f"cannot load model from {path}: not a valid safetensors file: {e}") from None
    except OSError as e:
        raise ModelLoadError(f"cannot read {path}: {e.strerror or e}") from None


class _Bad(Exception):
    """What is wrong with the file (the message's tail)."""


def _check_header(header: bytes, data_bytes: int) -> dict[str, Header]:
    try:
        entries = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _Bad(f"its header is not JSON ({e})") from None
    except RecursionError:
        raise _Bad("its header nests JSON too deeply") from None
    if not isinstance(entries, dict):
        raise _Bad("its header is not a JSON object")
    meta = entries.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise _Bad("its __metadata__ is not an object of strings")
    spans = sorted((_span(name, entry), name) for name, entry in entries.items())
    at = 0
    for (begin, end), name in spans:
        if begin != at:
            raise _Bad(f"tensor {name!r} starts at data byte {begin:,}, not {at:,} "
                       f"({'overlapping the one before' if begin < at else 'leaving a gap'})")
        at = end
    if at != data_bytes:
        raise _Bad(f"its tensors span {at:,} data bytes; the file holds {data_bytes:,}")
    return {name: Header(entry["dtype"], tuple(entry["shape"])) for name, entry in entries.items()}


def _span(name: str, entry) -> tuple[int, int]:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _Bad(f"tensor {name!r} is not an object of dtype, shape and data_offsets")
    bits = DTYPE_BITS.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if bits is None:
        raise _Bad(f"tensor {name!r} has unknown dtype {entry['dtype']!r}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_whole(d) for d in shape):
        raise _Bad(f"tensor {name!r} has shape {shape!r}, not a list of whole numbers >= 0")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_whole(o) for o in offsets)
            and offsets[0] <= offsets[1]):
        raise _Bad(f"tensor {name!r} has data_offsets {offsets!r}, not [begin, end] with begin <= end")
    need = prod(shape) * bits  # exact integers: a 10^12-element shape is a number here, never an allocation
    if need != (offsets[1] - offsets[0]) * 8:
        raise _Bad(f"tensor {name!r} of {entry['dtype']} {shape} needs {need / 8:,.0f} bytes; "
                   f"its data_offsets span {offsets[1] - offsets[0]:,}")
    return offsets[0], offsets[1]


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
