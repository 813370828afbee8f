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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

import torch

from ..errors import ModelLoadError
from ..files.atomic import atomic_dir, check_output_dir, write_errors
from ..files.shards import SHARD_BYTES, SINGLE, ShardWriter
from ..formats.registry import format_by_id, get_format
from ..layers.hf_quantizer import refuse_save_pretrained
from ..layers.keep_dtype import NarrowEmbedding, round_state
from ..layers.linear import QuantLinear
from ..layers.outlier_linear import Int8OutlierLinear, check_threshold
from ..layers.surgery import QuantizeReport
from ..models.architectures import with_architectures
from ..models.lazy import Checkpoint
from ..models.loader import CAUSAL_LM, ModelInfo, as_load_error, model_kind, resolve, shape_mismatch
from ..planning.plan import QuantPlan
from ..quantize import quantize
from ..tensor import QuantizedTensor
from .gguf_export import layer_list
from .meta_checks import check_meta

LAYOUT_VERSION = 1
META_FILE = "lowbit.json"
TENSOR_FILE = SINGLE  # or shards and their index, past SHARD_BYTES (lowbit.files.shards)
_QW = ".qweight."  # infix of packed-part keys: "<layer>.qweight.<part>"
_SIGNS = ".rotation_signs"  # a +had layer's int8 signs: "<layer>.rotation_signs"


def save_quantized(model, tokenizer, info: ModelInfo, report: QuantizeReport, plan: QuantPlan, directory, *,
                   overwrite=False, keep_dtype: torch.dtype = torch.float32, extra: dict | None = None,
                   label: str | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write ``model`` (already through ``quantize_model``, which gave ``report``) to ``directory``, atomically.

    The tensors quantization left alone (embeddings, norms, biases) are stored in ``keep_dtype``
    and rounded through it in ``model`` too, so the model in memory computes what the saved one
    will; ``model_bytes_after`` in ``lowbit.json`` counts them at that dtype. ``extra``: more sections for
    ``lowbit.json`` (``lowbit qat`` records its training); ``label``: the name reports give the model
    instead of the plan's label (``int3/64 qat``). A model larger than ``shard_bytes`` is written in shards
    (``lowbit.files.shards``).
    """
    check_output(directory, overwrite=overwrite, source=local_source(info.source))
    saved = round_state(model, keep_dtype)  # after the checks: a refused save leaves the model as it was
    layers, tensors = {}, {}
    labels, fallbacks = dict(report.layer_configs), dict(report.fallbacks)
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            layers[name], stored = stored_layer(name, module, labels.get(name), fallbacks.get(name))
            tensors.update(stored)
    tied = {}
    first_of: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        where = (t.data_ptr(), t.numel(), t.dtype)  # safetensors refuses shared storage: save once
        if where in first_of:
            tied[key] = first_of[where]
        else:
            first_of[where] = key
            t = t.detach()
            tensors[key] = t.to(keep_dtype) if t.is_floating_point() else t
    meta = quantized_meta(info, plan, keep_dtype, report, report.model_bytes_after - saved, layers, tied, extra, label)
    with writing_output(directory, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, shard_bytes)
        for key, t in tensors.items():
            writer.add(key, t)
        writer.close()
        write_model_files(tmp, model, tokenizer, meta)
    return Path(directory)


def stored_layer(name: str, layer: QuantLinear, label: str | None, fallback: str | None) -> tuple[dict, dict]:
    """``(entry, tensors)``: what ``lowbit.json`` says of one quantized layer (``layers.NAME``) and the tensors it
    stores (its packed parts, and a +had layer's signs)."""
    q = layer.qweight
    entry = {"format": q.format.name, "format_id": q.format.id, "shape": list(q.shape),
             "dtype": str(q.dtype).removeprefix("torch."), "block_size": q.block_size,
             "double_quant": q.double_quant, "parts": list(q.parts)}
    entry |= {"label": label} if label is not None else {}
    entry |= {"fallback_from": fallback} if fallback is not None else {}
    if isinstance(layer, Int8OutlierLinear):  # LLM.int8(): the activations are split at run time
        entry["outlier_threshold"] = layer.threshold
    tensors = {f"{name}{_QW}{part}": t for part, t in q.parts.items()}
    if layer.signs is not None:  # +had: the stored weight is W Q (lowbit.layers.rotation)
        entry["rotation"] = "hadamard"
        tensors[f"{name}{_SIGNS}"] = layer.signs
    return entry, tensors


@contextmanager
def writing_output(directory, *, overwrite: bool = False) -> Iterator[Path]:
    """A temp directory that becomes ``directory`` when the block succeeds (``check_output`` first): an --overwrite
    replaces only an earlier lowbit output, and a failed write is one OSError naming ``directory``."""
    with write_errors(directory), atomic_dir(directory, overwrite=overwrite, replaceable=_replaceable) as tmp:
        yield tmp


def quantized_meta(info: ModelInfo, plan: QuantPlan, keep_dtype: torch.dtype, report: QuantizeReport,
                   model_bytes_after: int, layers: dict, tied: dict, extra: dict | None = None,
                   label: str | None = None) -> dict:
    """``lowbit.json``'s contents but the list of files written."""
    config = plan.uniform_config
    if config is None:  # a mixed model: the plan says what each layer is; "config" names it
        config_meta = {"label": plan.label, "format": None, "block_size": None, "double_quant": False,
                       "search": None, "include": [], "exclude": []}
    else:
        config_meta = {"label": config.label, "format": get_format(config.format).name,
                       "block_size": config.block_size, "double_quant": config.double_quant, "search": config.search,
                       "include": list(plan.include), "exclude": list(plan.exclude)}
    meta = {
        "lowbit_layout": LAYOUT_VERSION,
        "config": config_meta | {"keep_dtype": str(keep_dtype).removeprefix("torch.")},
        "plan": plan.to_dict(),
        "model": asdict(info),
        "quantize": {"bits_per_weight": report.bits_per_weight, "model_bytes_before": report.model_bytes_before,
                     "model_bytes_after": model_bytes_after, "seconds": report.seconds},
        "layers": layers,
        "tied": tied,
    } | (extra or {})
    if label is not None:
        meta["config"]["label"] = label
    return meta


def write_model_files(tmp: Path, model, tokenizer, meta: dict) -> None:
    """``model``'s config.json, the tokenizer's files and ``lowbit.json`` beside the tensors already in ``tmp``;
    ``lowbit.json`` lists every file, the only entries a later --overwrite may replace (_foreign)."""
    with_architectures(model).save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    meta["files"] = sorted([p.name for p in tmp.iterdir()] + [META_FILE])
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def check_output(directory, *, overwrite: bool = False, source: str | Path | None = None) -> Path:
    """Refuse an output ``save_quantized`` must not write, before any work: one that is, holds
    or lies inside the model being quantized (``source``, a file or directory), or, with
    ``overwrite``, an existing directory that is neither empty nor an earlier lowbit output."""
    path = check_output_dir(directory, overwrite=overwrite)
    out = path.resolve()
    if source is not None:
        src = Path(source).resolve()
        if out == src or out in src.parents or src in out.parents:
            raise FileExistsError(f"output {path} would overwrite the input model {source}; choose another directory")
    foreign = _foreign(path) if path.is_dir() else []
    if foreign:
        raise FileExistsError(f"--overwrite replaces only an empty directory or an earlier lowbit output; {path} "
                              f"holds {layer_list(foreign)}, which lowbit did not write there")
    return path


def local_source(spec: str | None) -> str | None:
    """The file or directory ``load_model(spec)`` reads, or None for a hub id (or a vanished path)."""
    try:
        how, target = resolve(spec)
    except ModelLoadError:
        return None
    return None if how == "hub" else target


# What save_quantized wrote before lowbit.json listed its "files" (transformers 5's tokenizer files;
# special_tokens_map.json from transformers 4): an output of that time may hold these and no more.
_FILES_BEFORE_LISTING = (META_FILE, TENSOR_FILE, "config.json", "tokenizer.json", "tokenizer_config.json",
                         "chat_template.jinja", "special_tokens_map.json")


def _replaceable(path: Path) -> bool:
    return not _foreign(path)


def _foreign(path: Path) -> list[str]:
    """The entries of directory ``path`` that no lowbit save wrote (sorted; all of them when it holds no
    lowbit.json): an --overwrite would delete a user's files with the output around them."""
    entries = sorted(p.name for p in path.iterdir())
    try:
        meta = json.loads((path / META_FILE).read_text())
    except (OSError, ValueError):
        meta = None
    if not isinstance(meta, dict) or "lowbit_layout" not in meta:
        return entries
    written = meta.get("files", list(_FILES_BEFORE_LISTING))
    written = set(written) if isinstance(written, list) and all(isinstance(n, str) for n in written) else set()
    return [name for name in entries if name not in written or not (path / name).is_file()]


def read_meta(directory) -> dict:
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise ModelLoadError(f"not a lowbit model directory (no {META_FILE}): {directory}")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"corrupt {path}: {e}") from e
    if not isinstance(meta, dict) or meta.get("lowbit_layout") != LAYOUT_VERSION:
        found = meta.get("lowbit_layout") if isinstance(meta, dict) else None
        raise ModelLoadError(f"{path}: layout version {found!r}; this lowbit reads {LAYOUT_VERSION}")
    check_meta(meta, path)
    return meta


def load_quantized(directory):
    """``(model, tokenizer, meta)`` from a directory written by ``save_quantized`` or, in shards,
    ``quantize_to_directory``. Tensor by tensor: the architecture is built on the meta device and each
    stored tensor is read when its place in the model is filled, so memory holds the model and one tensor
    more, never the file's tensors beside the model's (tests/io/test_lazy_load.py)."""
    directory = Path(directory)
    meta = read_meta(directory)
    checkpoint = Checkpoint(directory)  # each file from its header alone, before safetensors maps it
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    with as_load_error(directory):
        config = AutoConfig.from_pretrained(directory, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
        kind = meta["model"]["kind"]
        if model_kind(config.to_dict()) != kind:  # e.g. a Llama an older lowbit took for an encoder
            raise ModelLoadError(f"{directory}: {META_FILE} says model.kind {kind!r}, but config.json describes "
                                 f"a {model_kind(config.to_dict())} ({config.model_type}); quantize it again")
        cls = AutoModelForCausalLM if kind == CAUSAL_LM else AutoModel
        # Parameters on the meta device: each is replaced by its stored tensor below, so no float32 copy
        # of the whole model is ever allocated (buffers such as RoPE's inv_freq are built as usual).
        with init_empty_weights(include_buffers=False):
            model = cls.from_config(config, dtype=torch.float32).eval()
        mismatch = shape_mismatch(model, checkpoint.files)  # from the headers, before anything is read
        if mismatch:
            raise ModelLoadError(f"cannot load model from {directory}: {mismatch}")
        for name, layer in meta["layers"].items():
            _check_architecture(model, name, layer["shape"])  # before quantizing zeros of a shape it names
            q = _stored_qweight(name, layer, checkpoint)
            signs = _stored_signs(name, layer, checkpoint)
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, _stored_module(name, layer, q, signs, model))
        _load_state(model, checkpoint, meta)
    refuse_save_pretrained(model)
    return model, tokenizer, meta


def _load_state(model, checkpoint: Checkpoint, meta: dict) -> None:
    """Every entry of ``model.state_dict()`` (the quantized layers already in place) read from ``checkpoint``
    one at a time and assigned, so a tensor is dropped or held by the model before the next is read; a tied
    alias is made the Parameter it names."""
    state = {key: t.shape for key, t in model.state_dict(keep_vars=True).items()}
    tied = meta["tied"]
    for alias, target in tied.items():
        if target not in checkpoint.where:
            raise ModelLoadError(f"{META_FILE}: tied.{alias} names {target!r}, which {TENSOR_FILE} does not hold")
        if alias not in state or state.get(target) != state[alias]:
            raise ModelLoadError(f"{META_FILE}: tied.{alias} is not a tensor of the architecture of {target}'s shape")
    packed = {f"{name}{_QW}{p}" for name, layer in meta["layers"].items() for p in layer["parts"]}
    packed |= {f"{name}{_SIGNS}" for name, layer in meta["layers"].items() if "rotation" in layer}
    unexpected = sorted(checkpoint.where.keys() - state.keys() - packed)
    if unexpected:
        raise ModelLoadError(f"{TENSOR_FILE} holds tensor {unexpected[0]}, which the architecture does not have")
    missing = sorted(state.keys() - checkpoint.where.keys() - tied.keys())
    if missing:
        raise ModelLoadError(f"{TENSOR_FILE} has no tensor {missing[0]}, which the architecture needs")
    shared = set(tied) | set(tied.values())  # a tied embedding is a head too: it stays float32
    for key in state:
        if key not in tied:  # no name holds the tensor as read: a bf16 one is gone once cast
            _assign(model, key, checkpoint.read(key), narrow=key not in shared)
    for alias, target in tied.items():  # one Parameter under both names, as before the save
        parent, _, attr = alias.rpartition(".")
        setattr(model.get_submodule(parent), attr, model.get_parameter(target))


def _assign(model, key: str, t: torch.Tensor, *, narrow: bool) -> None:
    """Stored tensor ``t`` made ``model``'s ``key``, in float32 as the model was built (a --keep-dtype save stored
    bf16/fp16); where ``narrow`` allows, an embedding's table as stored (``NarrowEmbedding``: the same rows at half
    the memory). A head keeps a float32 copy: computing it from a narrow one would cast all of it at every call."""
    parent, _, attr = key.rpartition(".")
    module = model.get_submodule(parent)
    if narrow and attr == "weight" and NarrowEmbedding.fits(module, t):
        grand, _, child = parent.rpartition(".")
        setattr(model.get_submodule(grand), child, NarrowEmbedding(module, t))
        return
    # assign=True keeps each tensor's dtype (and a Parameter's requires_grad)
    model.load_state_dict({key: t.float() if t.is_floating_point() else t}, strict=False, assign=True)


def _check_architecture(model, name: str, stated) -> None:
    """The layer ``lowbit.json`` names must be an ``nn.Linear`` of the stated shape in the
    architecture config.json describes: a reshaped layer would load, and compute nonsense."""
    try:
        linear = model.get_submodule(name)
    except AttributeError:
        raise ModelLoadError(f"{META_FILE} names layer {name!r}, which the model architecture does not have") from None
    shape = tuple(int(d) for d in stated)
    if not isinstance(linear, torch.nn.Linear) or tuple(linear.weight.shape) != shape:
        found = tuple(linear.weight.shape) if isinstance(linear, torch.nn.Linear) else type(linear).__name__
        raise ModelLoadError(f"{META_FILE}: layer {name} has shape {shape}, but the architecture's is {found}")


def _stored_module(name: str, layer: dict, q: QuantizedTensor, signs, model) -> QuantLinear:
    bias = model.get_submodule(name).bias
    if "outlier_threshold" not in layer:
        return QuantLinear(q, bias, signs)
    try:
        return Int8OutlierLinear(q, bias, check_threshold(layer["outlier_threshold"]), name)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{name}: {e}") from None


def _stored_signs(name: str, layer: dict, checkpoint: Checkpoint) -> torch.Tensor | None:
    rotation = layer.get("rotation")
    if rotation is None:
        return None
    if rotation != "hadamard":
        raise ModelLoadError(f"{name}: unknown rotation {rotation!r} (this lowbit knows 'hadamard')")
    signs = checkpoint.read(f"{name}{_SIGNS}") if f"{name}{_SIGNS}" in checkpoint.where else None
    width = int(layer["shape"][1])
    if signs is None or signs.dtype != torch.int8 or tuple(signs.shape) != (width,) or \
            not bool((signs.abs() == 1).all()):
        raise ModelLoadError(f"{name}: its rotation needs {width} int8 signs of +-1 stored as {name}{_SIGNS}")
    return signs


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@lru_cache(maxsize=64)
def _layout(fmt: str, shape: tuple[int, ...], block: int | None, dq: bool, hqq: bool) -> dict:
    """Part name -> (shape, dtype) that quantizing a ``shape`` tensor to ``fmt`` stores. Layers share a
    few shapes, so zeros are quantized once per shape; ``hqq``: the float zero point @hqq stores."""
    zeros = quantize(torch.zeros(shape), fmt, block_size=block, double_quant=dq)
    if hqq and "zeros" in zeros.parts:
        zeros = quantize(torch.zeros(shape), fmt, block_size=block, double_quant=dq, search="hqq")
    return {p: (tuple(t.shape), t.dtype) for p, t in zeros.parts.items()}


def check_layout(q: QuantizedTensor, name: str) -> QuantizedTensor:
    """``q``, if its parts are what quantizing a tensor of its shape, format and block stores; else a
    ModelLoadError naming ``name``. The decoders (C kernels included) trust part sizes, so a file
    whose parts do not match is refused here rather than read out of bounds."""
    # a float zero point (float16, chosen by @hqq) instead of the uint8 code: docs/formats.md#zero-point-integers
    hqq = "zeros" in q.parts and q.parts["zeros"].is_floating_point()
    # first a bound that allocates nothing: every format stores at least format.bits a weight (checked
    # for all in tests/io/test_meta_checks.py), and _layout below quantizes zeros of the stated shape
    stored = sum(t.numel() * t.element_size() for t in q.parts.values())
    if q.shape.numel() * q.format.bits > 8 * stored:
        raise ModelLoadError(f"{name}: {stored} stored bytes cannot hold a {q.format.name} tensor of shape "
                             f"{tuple(q.shape)} ({q.format.bits} bits a weight at least)")
    expected = _layout(q.format.name, tuple(q.shape), q.block_size, q.double_quant, hqq)
    found = {p: (tuple(t.shape), t.dtype) for p, t in q.parts.items()}
    if found != expected:
        raise ModelLoadError(f"{name}: stored parts {found} do not match a {q.format.name} tensor of shape "
                             f"{tuple(q.shape)}, block {q.block_size}: expected {expected}")
    return q


def _stored_qweight(name: str, layer: dict, checkpoint: Checkpoint) -> QuantizedTensor:
    """Layer ``name``'s QuantizedTensor from the file, its parts checked (check_layout)."""
    fmt, shape = format_by_id(int(layer["format_id"])), torch.Size(int(d) for d in layer["shape"])
    missing = [f"{name}{_QW}{p}" for p in layer["parts"] if f"{name}{_QW}{p}" not in checkpoint.where]
    if missing:
        raise ModelLoadError(f"{name}: {TENSOR_FILE} has no tensor {missing[0]}, a part {META_FILE} names")
    parts = {p: checkpoint.read(f"{name}{_QW}{p}") for p in layer["parts"]}
    return check_layout(QuantizedTensor(format=fmt, shape=shape, dtype=_DTYPES[layer["dtype"]],
                                        block_size=int(layer["block_size"]), parts=parts,
                                        double_quant=bool(layer["double_quant"])), name)
