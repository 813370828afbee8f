"""Import another tool's quantized model as a lowbit model, its quantized bytes kept as they are.

- A GGUF file (llama.cpp): each linear layer stored in a GGUF type lowbit has (formats.table's
  gguf_type column) becomes a QuantLinear holding the file's block bytes, Llama's q and k rows
  put back in transformers' order (the inverse of the permutation gguf_export applies). Layers
  stored as F32/F16/BF16 stay full-precision layers; any other GGUF type is refused.
- A bitsandbytes 4-bit checkpoint (transformers' ``save_pretrained`` of a ``load_in_4bit``
  model): lowbit.io.bnb_checkpoint reads its parts.

Tensors lowbit keeps in full precision (embeddings, norms) are loaded as float32, as
``lowbit quantize`` keeps them. The result is what ``save_quantized`` writes, so ``lowbit eval``,
``generate`` and ``export`` take it like any lowbit output.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import ModelLoadError
from ..formats.registry import formats, get_format
from ..layers.surgery import QuantizeReport, quantize_model, reference_weight_bytes
from ..models import converted
from ..models.gguf_file import check_complete
from ..models.hashing import files_sha256, model_files
from ..models.loader import CAUSAL_LM, EMBEDDED, ModelInfo, as_load_error, model_kind, resolve
from ..planning.config import QuantConfig
from ..planning.plan import PlanRule, QuantPlan
from ..tensor import QuantizedTensor
from . import bnb_checkpoint
from .gguf_export import SUPPORTED_ARCHS, from_gguf_rows, gguf_tensor_names, layer_list
from .model_io import check_layout

GGUF_FORMATS = {get_format(f).gguf_type: get_format(f) for f in formats() if get_format(f).gguf_type}
GGUF_FLOAT = ("F32", "F16", "BF16")  # full-precision GGUF types: such a layer stays an nn.Linear


@dataclass
class Imported:
    """What ``save_quantized`` needs: the model with its QuantLinear layers, and where it came from."""

    model: nn.Module
    tokenizer: object
    info: ModelInfo
    plan: QuantPlan
    report: QuantizeReport


def import_model(source: str | Path, *, progress: bool = False) -> Imported:
    """A ``.gguf`` file (or ``"smollm2"``, the embedded one) or a bitsandbytes 4-bit checkpoint
    directory, as a lowbit model."""
    how, target = resolve(str(source))
    if how == "gguf":
        return import_gguf(target, spec=str(source), progress=progress)
    if how == "directory":
        return import_bnb(target, progress=progress)
    raise ModelLoadError(f"lowbit imports a local .gguf file or bitsandbytes 4-bit checkpoint directory; "
                         f"{source} is neither")


def import_gguf(path: str | Path, *, spec: str | None = None, progress: bool = False) -> Imported:
    """``spec``: what ModelInfo.source records (an embedded model's name); the path by default.

    The architecture comes from transformers' reading of the GGUF metadata and is built on the
    meta device: no float32 copy of a quantized layer is ever made. Every other tensor is
    dequantized by gguf-py, as transformers' GGUF loader does (tested equal to it).
    """
    path = Path(path)
    check_complete(path)  # first: a crafted header is refused before seconds of imports
    import gguf
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with as_load_error(path):
        reader = gguf.GGUFReader(path)  # an unknown type number fails here (gguf-py's enum)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if arch not in SUPPORTED_ARCHS:
        raise ModelLoadError(f"lowbit imports GGUF files of the architectures {', '.join(SUPPORTED_ARCHS)}; "
                             f"{path} is {arch}")
    refused = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors
               if len(t.shape) == 2 and t.name.startswith("blk.")
               and t.tensor_type.name not in GGUF_FORMATS and t.tensor_type.name not in GGUF_FLOAT]
    if refused:
        raise ModelLoadError(f"lowbit imports the GGUF types {', '.join(GGUF_FORMATS)} (and {', '.join(GGUF_FLOAT)}); "
                             f"{len(refused)} tensor(s) are in others: {layer_list(refused)}")
    stored = {t.name: t for t in reader.tensors}
    with as_load_error(path):
        file_hash = files_sha256([path])
        # transformers parses the GGUF metadata (the tokenizer's 49k strings: ~10 s each for the config and
        # the tokenizer); a file lowbit has loaded before has both in its converted-model cache.
        cached = converted.lookup(file_hash, quiet=True)
        where, kwargs = (cached, {}) if cached else (path.parent, {"gguf_file": path.name})
        with converted.announced(f"reading the config and tokenizer of {path.name}") if not cached else nullcontext():
            config = AutoConfig.from_pretrained(where, local_files_only=True, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(where, local_files_only=True, **kwargs)
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        names = gguf_tensor_names(model)
        layers, state = {}, {}
        for name, module in model.named_modules():
            t = stored.get(names(name)) if isinstance(module, nn.Linear) else None
            if t is not None and t.tensor_type.name in GGUF_FORMATS:
                layers[name] = _gguf_layer(t, name, module, config)
        for key, param in model.named_parameters():
            owner = key.rpartition(".")[0]
            if owner in layers or (owner == "lm_head" and config.tie_word_embeddings):
                continue
            t = stored.get(names(owner)) if key.endswith(".weight") else None
            if t is None:
                raise ModelLoadError(f"{path}: no tensor for {key} (GGUF name {names(owner)})")
            values = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32))
            state[key] = from_gguf_rows(values.reshape(param.shape), owner, config).contiguous()
        model.load_state_dict(state, strict=False, assign=True)
        if config.tie_word_embeddings:
            model.tie_weights()
        info = ModelInfo(CAUSAL_LM, spec if spec in EMBEDDED else str(path.absolute()), file_hash, path.stem)
    return _install(model, tokenizer, info, layers, f"imported from {path.name}", progress)


def _gguf_layer(t, name: str, linear: nn.Linear, config) -> QuantizedTensor:
    """The QuantizedTensor holding GGUF tensor ``t``'s blocks, rows in transformers' order."""
    fmt = GGUF_FORMATS[t.tensor_type.name]
    rows = from_gguf_rows(torch.from_numpy(np.array(t.data)), name, config)  # a copy: the reader maps the file
    q = QuantizedTensor(format=fmt, shape=linear.weight.shape, dtype=torch.float32,
                        block_size=fmt.default_block_size, parts={"data": rows.reshape(-1, fmt.block_bytes)})
    return check_layout(q, t.name)


def import_bnb(directory: str | Path, *, progress: bool = False) -> Imported:
    directory = Path(directory)
    config_dict, tensors, layers = bnb_checkpoint.read_checkpoint(directory)  # checked before seconds of imports
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    kind = model_kind(config_dict)
    with as_load_error(directory):
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        del config.quantization_config  # the layers become QuantLinear here, not bitsandbytes' Linear4bit
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        with init_empty_weights(include_buffers=False):  # every parameter comes from the file
            model = (AutoModelForCausalLM if kind == CAUSAL_LM else AutoModel).from_config(config,
                                                                                           dtype=torch.float32)
        model.eval()
        for name, q in layers.items():
            linear = _linear(model, name)
            if tuple(linear.weight.shape) != tuple(q.shape):
                raise ModelLoadError(f"{directory}: {name} is {tuple(q.shape)} in the file and "
                                     f"{tuple(linear.weight.shape)} in the architecture config.json describes")
            tensors[f"{name}.weight"] = torch.empty(q.shape, device="meta")  # replaced by the QuantLinear
        result = model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in tensors.items()},
                                       strict=False, assign=True)
        missing = [k for k in result.missing_keys if not _tied(model, k)]
        if missing or result.unexpected_keys:
            raise ModelLoadError(f"{directory}: tensors missing ({layer_list(missing)}) or unexpected "
                                 f"({layer_list(result.unexpected_keys)}) for the architecture in config.json")
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
        file_hash = files_sha256(model_files(directory), root=directory)  # as load_model hashes it
    info = ModelInfo(kind, str(directory.absolute()), file_hash, directory.name)
    return _install(model, tokenizer, info, layers, f"imported from {directory.name}", progress)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        linear = None
    if not isinstance(linear, nn.Linear):
        raise ModelLoadError(f"the file holds a 4-bit layer {name}, which is not a linear layer of the "
                             f"architecture config.json describes")
    return linear


def _tied(model: nn.Module, key: str) -> bool:
    """Whether ``key`` is the output head transformers ties to the input embedding (absent from the file)."""
    head = model.get_output_embeddings()
    return head is not None and getattr(model.config, "tie_word_embeddings", False) and \
        model.get_submodule(key.rpartition(".")[0]) is head


def _install(model, tokenizer, info: ModelInfo, layers: dict[str, QuantizedTensor], name: str,
             progress: bool) -> Imported:
    """Swap each named layer for a QuantLinear of its imported weight, through quantize_model, which
    counts the bytes; the plan names each layer's format exactly, so eval and export see what it is."""
    if not layers:
        raise ModelLoadError(f"{info.source}: no linear layer is stored in a quantized type lowbit imports")
    rules = [PlanRule(layer, QuantConfig(q.format.name, block_size=q.block_size, double_quant=q.double_quant))
             for layer, q in layers.items()]
    plan = QuantPlan(tuple(rules), name=name)
    report = quantize_model(model, plan, progress=progress, prequantized=layers)
    # quantize_model counted the model before its layers held their imported weights (only the rest): the
    # reference is the float model those weights stand for, as compare and eval count it
    report = replace(report, model_bytes_before=reference_weight_bytes(model))
    return Imported(model, tokenizer, info, plan, report)
