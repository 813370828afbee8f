"""GGUF import: a file's block bytes become lowbit tensors unchanged, and export writes them back."""

import gguf
import numpy as np
import pytest
import torch

from lowbit import QuantLinear
from lowbit.errors import ModelLoadError
from lowbit.io.gguf_export import _permute, export_gguf, from_gguf_rows
from lowbit.io.importers import import_model
from lowbit.models.loader import resolve


def quant_layers(model) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


@pytest.fixture(scope="module")
def imported():
    return import_model("smollm2")


def test_from_gguf_rows_undoes_the_export_permutation():
    class Cfg:
        num_attention_heads, num_key_value_heads = 6, 2

    rows = torch.arange(48 * 3).reshape(48, 3)
    for name, heads in (("x.q_proj", 6), ("x.k_proj", 2)):
        assert torch.equal(from_gguf_rows(_permute(rows, heads), name, Cfg), rows)
    assert from_gguf_rows(rows, "x.v_proj", Cfg) is rows


def test_the_embedded_file_imports_byte_for_byte(imported, smollm2):
    """Every linear layer of the embedded SmolLM2 is Q4_1: imported as q4_1 holding the file's blocks,
    its dequantized weight the very float32 weight transformers' GGUF loader gives (the reference)."""
    layers = quant_layers(imported.model)
    assert len(layers) == 210 and {m.qweight.format.name for m in layers.values()} == {"q4_1"}
    assert imported.report.format_counts == {"q4_1": 210} and imported.info.source == "smollm2"
    reference = dict(smollm2[0].named_parameters())
    for name, m in layers.items():
        assert torch.equal(m.qweight.dequantize(), reference[name + ".weight"]), name
    ours = dict(imported.model.named_parameters())  # embedding (Q8_0 in the file) and norms
    assert ours.keys() == {k for k in reference if k.removesuffix(".weight") not in layers}
    for key, p in ours.items():
        assert p.dtype == torch.float32 and torch.equal(p, reference[key]), key
    assert not isinstance(imported.model.lm_head, QuantLinear)  # tied to the Q8_0 token_embd, kept in float32


def test_export_writes_the_imported_bytes_back(imported, tmp_path):
    path = tmp_path / "back.gguf"
    export_gguf(imported.model, imported.info.source, path)
    original = {t.name: t for t in gguf.GGUFReader(resolve(None)[1]).tensors}
    back = {t.name: t for t in gguf.GGUFReader(path).tensors}
    quantized_names = [n for n, t in original.items() if t.tensor_type.name == "Q4_1"]
    assert len(quantized_names) == 210
    for name in quantized_names:
        assert back[name].tensor_type == original[name].tensor_type
        assert np.array_equal(np.asarray(back[name].data), np.asarray(original[name].data)), name


def gguf_with(path, arch: str, tensor_type: gguf.GGMLQuantizationType):
    """A tiny GGUF file holding one 256x256 linear weight of ``tensor_type`` (its bytes zero)."""
    writer = gguf.GGUFWriter(path, arch)
    block, size = gguf.GGML_QUANT_SIZES[tensor_type]
    writer.add_tensor("blk.0.attn_q.weight", np.zeros((256, 256 // block * size), np.uint8), raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unknown_tensor_types_and_architectures_are_refused(tmp_path):
    with pytest.raises(ModelLoadError, match=r"lowbit imports the GGUF types Q8_0, Q4_0.*1 tensor\(s\) are in "
                                             r"others: blk.0.attn_q.weight \(Q2_K\)"):
        import_model(gguf_with(tmp_path / "q2k.gguf", "llama", gguf.GGMLQuantizationType.Q2_K))
    with pytest.raises(ModelLoadError, match="architectures llama; .* is gpt2"):
        import_model(gguf_with(tmp_path / "gpt2.gguf", "gpt2", gguf.GGMLQuantizationType.Q4_0))
    with pytest.raises(ModelLoadError, match="model path does not exist"):
        import_model(tmp_path / "absent.gguf")
