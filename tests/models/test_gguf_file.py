"""A .gguf file cut short is refused in one line naming it, wherever the cut falls; one whose header declares
absurd counts, dimensions, lengths or offsets (written byte by byte here) is refused from the header alone:
one-line ModelLoadError, fast, and no memory of the declared size (issue 25, deliverable 3)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from lowbit import load_model
from lowbit.errors import ModelLoadError
from lowbit.io.importers import import_model
from lowbit.models import resolve
from lowbit.models.gguf_file import check_complete

from .helpers import refused_cheaply

EMBEDDED = Path(resolve(None)[1])


def _cut_points() -> dict[str, int]:
    data = EMBEDDED.read_bytes()
    table = data.find(b"blk.0.attn_q.weight")  # a tensor name: only the tensor table holds one
    assert table > 0
    return {"magic": 2, "header": 24, "metadata": 4096, "tensor table": table + 5, "data": len(data) // 2,
            "last byte": len(data) - 1}


CUTS = _cut_points()
SECTION = {"magic": "header", "header": "metadata", "metadata": "metadata", "tensor table": "tensor table"}


@pytest.mark.parametrize("where", list(CUTS))
def test_truncated_gguf_is_one_line_error(tmp_path, where):
    cut = tmp_path / "cut.gguf"
    with open(EMBEDDED, "rb") as f:
        cut.write_bytes(f.read(CUTS[where]))
    with pytest.raises(ModelLoadError, match=rf"^not a complete GGUF file: .*cut\.gguf \({CUTS[where]} bytes; ") as err:
        load_model(cut)
    message = str(err.value)
    assert "\n" not in message and "unpack_from" not in message
    if where in SECTION:
        assert f"it ends inside the {SECTION[where]}" in message and message.endswith(")")
    else:  # the tensor table is whole, the data is not: say how many bytes it needs
        assert message.endswith(f"its tensor table needs {EMBEDDED.stat().st_size})")


def test_complete_file_passes_and_non_gguf_is_left_to_the_loader(tmp_path):
    check_complete(EMBEDDED)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"not a gguf file" * 100)
    check_complete(other)  # not GGUF at all: the loader's own error names it
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="it is empty"):
        check_complete(empty)


F32, Q8_0 = 0, 8  # ggml types (gguf-py GGMLQuantizationType)


UINT32, STRING, ARRAY = 4, 8, 9  # GGUF metadata value types


def s(text: bytes | str, length: int | None = None) -> bytes:
    """A GGUF string: u64 length, then the bytes (``length`` may lie)."""
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw) if length is None else length) + raw


def kv(key: str, kind: int, value: bytes) -> bytes:
    return s(key) + struct.pack("<I", kind) + value


def tensor(name: str, shape: list[int], ggml_type: int = F32, offset: int = 0) -> bytes:
    return s(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape, ggml_type, offset)


def gguf(kvs=(), tensors=(), *, n_kvs=None, n_tensors=None, data=b"", alignment=32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kvs is None else n_kvs)
    body = head + b"".join(kvs) + b"".join(tensors)
    return body + b"\0" * (-len(body) % alignment) + data


GGUF_CASES = {
    "10^12-element tensor": (gguf(tensors=[tensor("w", [10**6, 10**6])], data=b"\0" * 64),
                             "its tensor table needs 4000000000096"),
    "10^9 tensors": (gguf(n_tensors=10**9), "declares 1,000,000,000 tensors; lowbit reads at most 65,536"),
    "10^9 keys": (gguf(n_kvs=10**9), "declares 1,000,000,000 metadata keys"),
    "2^40-byte string": (gguf([kv("general.name", STRING, s(b"x", 2**40))]),
                         "it ends inside the metadata: 1,099,511,627,776 bytes declared at byte"),
    "2^40-byte key": (gguf([s(b"k", 2**40)]), "1,099,511,627,776 bytes declared"),
    "10^12 strings": (gguf([kv("tokenizer.ggml.tokens", ARRAY, struct.pack("<IQ", STRING, 10**12))]),
                      "declares 1,000,000,000,000 strings and arrays inside arrays; lowbit reads at most 2,097,152"),
    "2^40 floats": (gguf([kv("scores", ARRAY, struct.pack("<IQ", 6, 2**40))]), "4,398,046,511,104 bytes declared"),
    "overlapping offsets": (gguf(tensors=[tensor("a", [32]), tensor("b", [32], offset=96)], data=b"\0" * 256),
                            "overlaps tensor 'b' with 'a'"),
    "out-of-file offset": (gguf(tensors=[tensor("a", [8], offset=2**40)], data=b"\0" * 32),
                           "its tensor table needs 1099511627872"),
    "misaligned offset": (gguf(tensors=[tensor("a", [8], offset=4)], data=b"\0" * 64), "not a multiple of 32"),
    "5 dimensions": (gguf(tensors=[tensor("a", [1, 1, 1, 1, 1])]), "5 dimensions (ggml has at most 4)"),
    "2^64 elements": (gguf(tensors=[tensor("a", [2**32, 2**32])]), "more than int64 counts"),
    "unknown type": (gguf(tensors=[tensor("a", [8], ggml_type=999)]), "the unknown ggml type 999"),
    "partial block": (gguf(tensors=[tensor("a", [31], ggml_type=Q8_0)]), "not whole blocks of 32"),
    "alignment 0": (gguf([kv("general.alignment", UINT32, struct.pack("<I", 0))]), "general.alignment 0"),
    "unknown value type": (gguf([kv("x", 99, b"")]), "unknown type 99"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_crafted_gguf_is_refused_from_its_header(tmp_path, case):
    data, needle = GGUF_CASES[case]
    path = tmp_path / "crafted.gguf"
    path.write_bytes(data)
    refused_cheaply(lambda: check_complete(path), needle, str(path))
    refused_cheaply(lambda: load_model(path), needle)
    refused_cheaply(lambda: import_model(path), needle)


def test_a_sound_small_gguf_passes():
    check_complete_bytes = gguf([kv("general.alignment", UINT32, struct.pack("<I", 64))],
                                [tensor("a", [8]), tensor("b", [32], Q8_0, offset=64)], data=b"\0" * 128,
                                alignment=64)
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".gguf") as f:
        f.write(check_complete_bytes)
        f.flush()
        check_complete(f.name)


def test_the_cli_refuses_a_crafted_gguf_in_one_line(tmp_path):
    path = tmp_path / "crafted.gguf"
    path.write_bytes(GGUF_CASES["10^9 tensors"][0])
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "quantize", "--model", str(path), "--format", "nf4",
                        "-o", str(tmp_path / "q")], capture_output=True, text=True, timeout=120)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr and "declares 1,000,000,000 tensors" in last, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["crafted.gguf"]
