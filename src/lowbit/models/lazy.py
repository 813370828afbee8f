"""A model whose weights stay in their files until a layer needs them.

``load_lazily(spec)`` builds the architecture on the meta device (nothing allocated) and reads from the
checkpoint's safetensors only the tensors no quantized layer replaces (embeddings, norms, biases, excluded
layers); ``Checkpoint.read`` gives each remaining weight when its layer is rounded (``quantize_model(...,
source=)``), so only one float weight is alive at a time. llm-compressor's "sequential onloading" and
llama.cpp's memory-mapped ``llama-quantize`` keep memory to the layer being worked on the same way.

The floats are the ones ``load_model`` gives: each tensor read and cast to float32 as transformers' loader
casts it, so what is rounded, and so every saved byte, is the same (tests/models/test_lazy.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from ..errors import ModelLoadError
from ..files.shards import INDEX, SINGLE
from ..files.spill import safetensors_name
from . import converted
from .hashing import files_sha256, model_files
from .header_checks import check_safetensors
from .loader import (
    CAUSAL_LM,
    ModelInfo,
    as_load_error,
    directory_kind,
    gguf_info,
    load_model,
    model_kind,
    recorded_source,
    resolve,
    shape_mismatch,
)


class Checkpoint:
    """The safetensors of a model directory: one ``model.safetensors``, or shards listed by its index. Each
    tensor is read on its own (``safe_open`` maps the file only while it reads), so reading a model tensor by
    tensor holds one tensor, never a shard."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index = self.directory / INDEX
        if index.is_file():
            with as_load_error(index):
                weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            for name in files:
                if not (self.directory / name).is_file():
                    raise ModelLoadError(f"{index} lists shard {name}, which {self.directory} does not hold")
        elif (self.directory / SINGLE).is_file():
            files, weight_map = [SINGLE], None
        else:
            raise ModelLoadError(f"{self.directory} holds no {SINGLE} and no {INDEX}")
        self.files = [self.directory / name for name in files]
        # from the headers alone, before any file is mapped
        self.headers = {path: check_safetensors(path) for path in self.files}
        self.where = {key: path for path, tensors in self.headers.items() for key in tensors}
        if weight_map is not None:
            unheld = [k for k, f in weight_map.items() if self.where.get(k) != self.directory / f]
            if unheld:
                raise ModelLoadError(f"{index} names tensor {unheld[0]} in {weight_map[unheld[0]]}, which does not "
                                     "hold it")

    def read(self, name: str) -> torch.Tensor:
        """Tensor ``name`` as stored."""
        from safetensors import safe_open

        path = self.where.get(name)
        if path is None:
            raise ModelLoadError(f"{self.directory}: no tensor {name} in its safetensors")
        with as_load_error(path), safe_open(path, "pt") as f:
            return f.get_tensor(name)


class LazyWeights:
    """Reads ``model``'s meta parameters from ``checkpoint`` by parameter name; a tied parameter (one tensor under
    two names, as a tied ``lm_head.weight``) from whichever of its names the checkpoint holds."""

    def __init__(self, model: nn.Module, checkpoint: Checkpoint):
        self.checkpoint = checkpoint
        names: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), []).append(name)
        self.aliases = {name: group for group in names.values() for name in group}

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Parameter ``name`` as float32, as ``load_model`` holds it; as ``dtype`` where that gives the same
        values as a cast of that float32 (``dtype`` the stored one: float32 holds every float16 and bfloat16), so
        that a tensor stored as it was read is never held in float32 too."""
        held = next((n for n in self.aliases.get(name, [name]) if n in self.checkpoint.where), name)
        t = self.checkpoint.read(held)
        return t if not t.is_floating_point() or t.dtype == dtype else t.float()

    def onload(self, model: nn.Module, skip: Iterable[str] = (), *, under: str = "") -> None:
        """Every meta parameter of ``model`` read in, but those whose every name is in ``skip`` (the weights of
        the layers ``quantize_model`` will read one at a time: a tied head's weight is read as the embedding it
        also is); ties are made again over the new tensors. ``under``: only the parameters of that submodule
        (a transformer block, ``model.layers.3``), read in place, so every module keeps its identity."""
        skip = set(skip)
        for name, p in _parameters(model, under):
            if p.is_meta and not all(n in skip for n in self.aliases[name]):
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr, nn.Parameter(self.read(name), requires_grad=False))
        if not under:
            model.tie_weights()

    @staticmethod
    def offload(model: nn.Module, under: str = "", *, skip: Iterable[str] = ()) -> None:
        """The parameters of submodule ``under`` (default the whole model) put back on the meta device, but
        those named in ``skip`` (``onload`` undone), their memory freed once nothing else holds them."""
        skip = set(skip)
        for name, p in _parameters(model, under):
            if not p.is_meta and name not in skip:
                parent, _, attr = name.rpartition(".")
                setattr(model.get_submodule(parent), attr,
                        nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False))
        if not under:
            model.tie_weights()  # a tied head held the embedding it shared


def _parameters(model: nn.Module, under: str) -> list[tuple[str, nn.Parameter]]:
    """``model``'s parameters by qualified name; ``under``: only those of that submodule."""
    if not under:
        return list(model.named_parameters())
    return [(f"{under}.{n}", p) for n, p in model.get_submodule(under).named_parameters()]


def load_lazily(spec: str | Path | None = None, *, verify: bool = False):
    """``(model, tokenizer, info, weights)``: ``load_model(spec)``'s model with every parameter on the meta
    device, read later from ``weights`` (a ``LazyWeights``). A model with no safetensors directory to read from
    (a GGUF file not converted yet, a hub id) is loaded whole by ``load_model``; then ``weights`` is None.
    ``verify``: read the model's files again for their sha256 (``lowbit.models.hashing``)."""
    how, target = resolve(spec)
    directory, info = _directory(spec, how, target, verify)
    if directory is None:
        return (*load_model(spec, verify=verify), None)
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    with as_load_error(directory):
        checkpoint = Checkpoint(directory)
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        said = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)  # before from_config sets it
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        kind = model_kind(config.to_dict())
        cls = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModel
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, dtype=torch.float32).eval()
        model.tie_weights()  # on the meta device from_config leaves a tied head untied
    mismatch = shape_mismatch(model, checkpoint.files)  # transformers' loader refuses these too (load_model)
    if mismatch:
        raise ModelLoadError(f"cannot load model from {directory}: {mismatch}")
    mismatch = dtype_mismatch(model, said, checkpoint)
    if mismatch:
        raise ModelLoadError(f"cannot load model from {directory}: {mismatch}")
    weights = LazyWeights(model, checkpoint)
    absent = [n for n, group in weights.aliases.items() if not any(a in checkpoint.where for a in group)]
    if absent:
        raise ModelLoadError(f"cannot load model from {directory}: {len(absent)} weights missing from the "
                             f"checkpoint, e.g. {sorted(absent)[0]}")
    return model, tokenizer, info, weights


def load_on_worker(spec: str | Path | None, file_hash: str):
    """``load_lazily(spec)`` on a worker of a cluster (``lowbit.cluster``): the files must be those the driver read
    (``file_hash``, its ``ModelInfo``'s), else a one-line ModelLoadError."""
    model, tokenizer, info, weights = load_lazily(spec)
    if info.file_hash != file_hash:
        raise ModelLoadError(f"the model at {info.source} on this node is not the one the run started with (sha256 "
                             "differs): every node must read the same files")
    return model, tokenizer, info, weights


def dtype_mismatch(model: nn.Module, said, checkpoint: Checkpoint) -> str | None:
    """The first stored tensor whose header's dtype is not ``said`` (config.json's ``torch_dtype``) where the
    architecture holds a float tensor (a quantized checkpoint's int8 codes, a shard from another export), said
    with both; None if none, or if config.json names no dtype. transformers' loader casts such a tensor without
    a word."""
    said = getattr(torch, said, None) if isinstance(said, str) else said
    if not isinstance(said, torch.dtype) or not said.is_floating_point:
        return None
    try:
        want = safetensors_name(said)
    except KeyError:  # one safetensors has no name for here (float8_e4m3fnuz): nothing to compare with
        return None
    floats = {key for key, t in model.state_dict().items() if t.is_floating_point()}
    for path, tensors in checkpoint.headers.items():
        for name, header in sorted(tensors.items()):
            if name in floats and header.dtype != want:
                return (f"tensor {name} in {path.name} is {header.dtype}; config.json's dtype says "
                        f"{str(said).removeprefix('torch.')} ({want})")
    return None


def _directory(spec, how: str, target: str, verify: bool) -> tuple[Path | None, ModelInfo | None]:
    """The safetensors directory ``load_model(spec)`` would read and the model's ``ModelInfo``; ``(None,
    None)`` where there is none yet, or where its tensors are not the float weights."""
    if how == "hub":
        return None, None
    path, source = Path(target), recorded_source(spec, target)
    if how == "gguf":
        info = gguf_info(path, source, verify)
        cached = converted.lookup(info.file_hash, verify=verify)
        return (cached, info) if cached is not None else (None, None)
    kind = directory_kind(path)
    with as_load_error(path):
        if "quantization_config" in json.loads((path / "config.json").read_text()):
            return None, None  # stored quantized (a bitsandbytes export): transformers' loader makes its layers
        file_hash = files_sha256(model_files(path), root=path, verify=verify)
    return path, ModelInfo(kind, source, file_hash, path.name)
