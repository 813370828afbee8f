"""Issue 25, deliverable 3: crafted files cannot exhaust memory. GGUF and safetensors files whose
headers declare absurd counts, dimensions, lengths or offsets, written byte by byte here, are refused
from the header alone: one-line ModelLoadError, fast, and no memory of the declared size."""

from __future__ import annotations

import json
import resource
import struct
import subprocess
import sys
import time

import pytest

from lowbit.errors import ModelLoadError
from lowbit.io import load_quantized
from lowbit.io.importers import import_model
from lowbit.models import load_model
from lowbit.models.gguf_file import check_complete
from lowbit.models.header_checks import check_safetensors

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


def refused_cheaply(call, *needles) -> str:
    """``call()`` raises a one-line ModelLoadError holding each needle, in well under a second,
    with the process's peak memory grown by less than 64 MB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    start = time.perf_counter()
    with pytest.raises(ModelLoadError) as err:
        call()
    assert time.perf_counter() - start < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 64 << 10
    message = str(err.value)
    assert "\n" not in message and all(n in message for n in needles), message
    return message


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


def safetensors(entries: dict, *, length: int | None = None, data: bytes = b"") -> bytes:
    header = json.dumps(entries).encode()
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


SAFETENSORS_CASES = {
    "2^40-byte header": (safetensors({}, length=2**40), "its header declares 1,099,511,627,776 bytes"),
    "10^12-element tensor": (safetensors({"w": entry(shape=(10**6, 10**6))}, data=b"\0" * 8),
                             "needs 4,000,000,000,000 bytes; its data_offsets span 8"),
    "offsets past the file": (safetensors({"w": entry(shape=(2**38,), offsets=(0, 2**40))}, data=b"\0" * 8),
                              "its tensors span 1,099,511,627,776 data bytes; the file holds 8"),
    "overlapping offsets": (safetensors({"a": entry(), "b": entry(offsets=(4, 12))}, data=b"\0" * 12),
                            "tensor 'b' starts at data byte 4, not 8 (overlapping the one before)"),
    "gap": (safetensors({"a": entry(offsets=(8, 16))}, data=b"\0" * 16), "leaving a gap"),
    "negative dimension": (safetensors({"a": entry(shape=(-2,))}, data=b"\0" * 8), "has shape [-2]"),
    "unknown dtype": (safetensors({"a": entry(dtype="F128")}, data=b"\0" * 8), "unknown dtype 'F128'"),
    "not JSON": (struct.pack("<Q", 4) + b"{{{{", "its header is not JSON"),
    "deep JSON": (struct.pack("<Q", 200000) + b"[" * 200000, "its header"),  # RecursionError in json
    "short": (b"\1\0", "shorter than the 8-byte header length"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_crafted_safetensors_is_refused_from_its_header(tmp_path, case):
    data, needle = SAFETENSORS_CASES[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(data)
    refused_cheaply(lambda: check_safetensors(path), needle, "not a valid safetensors file")
    # an HF directory, a lowbit output and a bitsandbytes checkpoint all read it through the check
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {
        "quant_method": "bitsandbytes", "load_in_4bit": True}}))
    refused_cheaply(lambda: load_model(tmp_path), needle)
    refused_cheaply(lambda: import_model(tmp_path), needle)
    (tmp_path / "lowbit.json").write_text(json.dumps({
        "lowbit_layout": 1, "model": {"kind": "causal-lm", "source": "smollm2", "file_hash": "0" * 64, "name": ""},
        "config": {"label": "x", "double_quant": False}, "layers": {}, "tied": {},
        "quantize": {"bits_per_weight": 4.0, "model_bytes_before": 1, "seconds": 0.0}}))
    refused_cheaply(lambda: load_quantized(tmp_path), needle)


def test_a_sound_safetensors_passes(tmp_path):
    import torch
    from safetensors.torch import save_file

    path = tmp_path / "ok.safetensors"
    save_file({"a": torch.zeros(3, 5), "b": torch.ones(7, dtype=torch.bfloat16), "c": torch.zeros(0)}, path,
              metadata={"format": "pt"})
    check_safetensors(path)
