"""safetensors headers checked before a tensor is read (issue 25, deliverable 3): files whose headers declare
absurd lengths, shapes or offsets, written byte by byte here, are refused from the header alone: one-line
ModelLoadError, fast, and no memory of the declared size, through every loader that reads one."""

from __future__ import annotations

import json
import struct

import pytest

from lowbit.io import load_quantized
from lowbit.io.importers import import_model
from lowbit.models import load_model
from lowbit.models.header_checks import check_safetensors

from .helpers import refused_cheaply


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
