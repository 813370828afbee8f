"""Save a quantized model to a directory and load it back, without re-quantizing.

Layout of DIR (no pickle anywhere):
  lowbit.json         what lowbit needs: layout version, the QuantConfig, where the
                      original model came from (and its file hash), each quantized layer's
                      format id, shape, dtype and block size, and tied tensor names
  model.safetensors   every tensor: the model's own state (biases, norms, embeddings) and
                      each QuantLinear's packed parts as ``<layer>.qweight.<part>``
  config.json, tokenizer files   written by transformers, to rebuild the architecture
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import ModelLoadError
from ..formats.registry import format_by_id, get_format
from ..models.loader import CAUSAL_LM, ModelInfo, as_load_error
from ..nn.linear import QuantLinear
from ..nn.surgery import QuantConfig, QuantizeReport
from ..tensor import QuantizedTensor
from .atomic import atomic_dir

LAYOUT_VERSION = 1
META_FILE, TENSOR_FILE = "lowbit.json", "model.safetensors"
_QW = ".qweight."  # infix of packed-part keys: "<layer>.qweight.<part>"


def save_quantized(model, tokenizer, info: ModelInfo, report: QuantizeReport, config: QuantConfig, directory, *,
                   overwrite=False) -> Path:
    """Write ``model`` (already through ``quantize_model``, which gave ``report``) to ``directory``, atomically."""
    layers, tensors = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            q = module.qweight
            layers[name] = {"format": q.format.name, "format_id": q.format.id, "shape": list(q.shape),
                            "dtype": str(q.dtype).removeprefix("torch."), "block_size": q.block_size,
                            "double_quant": q.double_quant, "parts": list(q.parts)}
            tensors.update({f"{name}{_QW}{part}": t.contiguous() for part, t in q.parts.items()})
    tied = {}
    first_of: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        where = (t.data_ptr(), t.numel(), t.dtype)  # safetensors refuses shared storage: save once
        if where in first_of:
            tied[key] = first_of[where]
        else:
            first_of[where] = key
            tensors[key] = t.detach().contiguous()
    meta = {
        "lowbit_layout": LAYOUT_VERSION,
        "config": {"label": config.label, "format": get_format(config.format).name, "block_size": config.block_size,
                   "double_quant": config.double_quant, "include": list(config.include),
                   "exclude": list(config.exclude)},
        "model": asdict(info),
        "quantize": {"bits_per_weight": report.bits_per_weight, "model_bytes_before": report.model_bytes_before,
                     "model_bytes_after": report.model_bytes_after, "seconds": report.seconds},
        "layers": layers,
        "tied": tied,
    }
    with atomic_dir(directory, overwrite=overwrite) as tmp:
        save_file(tensors, tmp / TENSOR_FILE, metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return Path(directory)


def read_meta(directory) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ModelLoadError(f"not a lowbit model directory (no {META_FILE}): {directory}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"corrupt {path}: {e}") from e
    if meta.get("lowbit_layout") != LAYOUT_VERSION:
        found = meta.get("lowbit_layout")
        raise ModelLoadError(f"{path}: layout version {found!r}; this lowbit reads {LAYOUT_VERSION}")
    return meta


def load_quantized(directory):
    """``(model, tokenizer, meta)`` from a directory written by ``save_quantized``."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    directory = Path(directory)
    meta = read_meta(directory)
    with as_load_error(directory):
        tensors = load_file(directory / TENSOR_FILE)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        cls = AutoModelForCausalLM if meta["model"]["kind"] == CAUSAL_LM else AutoModel
        model = cls.from_config(config).float().eval()
        for name, layer in meta["layers"].items():
            parts = {p: tensors.pop(f"{name}{_QW}{p}") for p in layer["parts"]}
            q = QuantizedTensor(format=format_by_id(layer["format_id"]), shape=torch.Size(layer["shape"]),
                                dtype=getattr(torch, layer["dtype"]), block_size=layer["block_size"], parts=parts,
                                double_quant=layer["double_quant"])
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, QuantLinear(q, model.get_submodule(name).bias))
        for alias, target in meta["tied"].items():
            tensors[alias] = tensors[target]
        model.load_state_dict(tensors, strict=True)
    return model, tokenizer, meta
