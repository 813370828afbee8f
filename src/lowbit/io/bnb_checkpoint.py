"""bitsandbytes' serialized 4-bit layout, both ways: write a lowbit model as a checkpoint that
transformers loads with its bitsandbytes integration, and read such a checkpoint back as
lowbit tensors. lowbit's nf4 and bnb_fp4 store bitsandbytes' own bytes
(docs/formats.md#normalfloat-and-bitsandbytes-fp4), so every part is copied, never requantized.

bitsandbytes 0.50 (nn/modules.py ``Linear4bit._save_to_state_dict``, functional.py
``QuantState.as_dict(packed=True)``) stores a 4-bit layer ``L`` as

  L.weight                   uint8 (ceil(n/2), 1): two codes a byte, the first in the high nibble
  L.weight.absmax            float32 per block; with double quant, uint8 codes of absmax - offset
  L.weight.quant_map         float32 (16,): the code table
  L.weight.nested_absmax     float32, one per 256 absmax        } double quant only
  L.weight.nested_quant_map  float32 (256,): the dynamic map     }
  L.weight.quant_state.bitsandbytes__<nf4|fp4>   uint8: the JSON of quant_type, blocksize,
      dtype, shape (and nested_blocksize, nested_dtype, nested_offset with double quant)

and transformers finds the layout from config.json's ``quantization_config``.

Blocks run over the flattened weight, across rows, as ``quantize_4bit`` and the CUDA kernels have
them. bitsandbytes 0.50.2's CPU kernels on a CPU with AVX-512 instead restart the blocks on every
row: ``dequantizeBlockwise4bitCpu`` (csrc/cpu_ops.cpp) indexes absmax by ``row * (n / blocksize)``,
and ``Linear4bit.forward``'s AVX512-BF16 repacking (functional.py ``_convert_weight_packed_for_cpu``)
reshapes absmax to ``(rows, n // blocksize)``. A layer whose rows do not hold whole blocks (576
wide in blocks of 256) is therefore read with the wrong scales there, or fails in inference, whoever
wrote it; export_bnb warns naming such layers (the file itself is what bitsandbytes writes).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import InputError, LowbitWarning, ModelLoadError
from ..files.atomic import atomic_dir, save_tensors, write_errors
from ..formats.registry import formats, get_format
from ..layers.keep_dtype import NarrowEmbedding
from ..layers.linear import QuantLinear
from ..models.architectures import with_architectures
from ..models.header_checks import check_safetensors
from ..models.loader import as_load_error
from ..scaling.double_quant import DQ_BLOCK, dynamic_map
from ..tensor import QuantizedTensor
from .gguf_export import ExportError, layer_list
from .model_io import check_layout

BNB_FORMATS = tuple(f for f in formats() if get_format(f).bnb_quant_type)  # formats.table's bnb_quant_type column
BNB_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096)  # bitsandbytes/_ops.py: the block sizes its kernels take
STATE_KEY = "quant_state.bitsandbytes__"
WEIGHTS_FILE = "model.safetensors"


def check_exportable(model: nn.Module) -> None:
    """Raise ExportError naming every quantized layer the bitsandbytes layout cannot hold."""
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            q = module.qweight
            if q.format.bnb_quant_type is None:
                bad.append(f"{name} ({q.format.name})")
            elif q.block_size not in BNB_BLOCKS:
                bad.append(f"{name} ({q.format.name}/{q.block_size}: bitsandbytes blocks are "
                           f"{', '.join(map(str, BNB_BLOCKS))})")
            elif module.signs is not None:
                bad.append(f"{name} ({q.format.name}+had: the rotation has no bitsandbytes form)")
    if bad:
        raise ExportError(f"bitsandbytes' 4-bit layout holds {', '.join(BNB_FORMATS)}; {len(bad)} layer(s) cannot "
                          f"be written in it: {layer_list(bad)}")


def quant_state(name: str, q: QuantizedTensor) -> dict[str, torch.Tensor]:
    """``name``'s tensors in bitsandbytes' layout, equal to ``QuantState.as_dict(packed=True)``'s."""
    fmt = q.format
    out = {name: q.parts["codes"].reshape(-1, 1),
           f"{name}.quant_map": torch.tensor(fmt.values, dtype=torch.float32)}
    info = {"quant_type": fmt.bnb_quant_type, "blocksize": q.block_size, "dtype": _dtype_name(q.dtype),
            "shape": list(q.shape)}
    if q.double_quant:
        out |= {f"{name}.absmax": q.parts["scales_q"], f"{name}.nested_absmax": q.parts["scales_absmax"],
                f"{name}.nested_quant_map": dynamic_map().clone()}
        info |= {"nested_blocksize": DQ_BLOCK, "nested_dtype": "float32",
                 "nested_offset": q.parts["scales_offset"].item()}
    else:
        out[f"{name}.absmax"] = q.parts["scales"]
    # bitsandbytes/utils.py pack_dict_to_tensor: the JSON's UTF-8 bytes as a uint8 tensor
    out[f"{name}.{STATE_KEY}{fmt.bnb_quant_type}"] = torch.frombuffer(bytearray(json.dumps(info).encode()),
                                                                       dtype=torch.uint8)
    return out


def export_bnb(model: nn.Module, tokenizer, out: str | Path) -> dict[str, int]:
    """Write ``model`` to the directory ``out`` (which must not exist) in bitsandbytes' layout; returns
    the number of layers per bitsandbytes quant type (and "float" for linear layers left unquantized).
    Warns (LowbitWarning) naming the layers whose rows do not hold whole blocks (module docstring)."""
    check_exportable(model)
    tensors: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    skip = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            q = module.qweight
            tensors |= quant_state(f"{name}.weight", q)
            counts[q.format.bnb_quant_type] = counts.get(q.format.bnb_quant_type, 0) + 1
        elif isinstance(module, nn.Linear):
            skip.append(name)
            counts["float"] = counts.get("float", 0) + 1
    if not counts.keys() - {"float"}:
        raise ExportError("the model has no 4-bit layer to write in bitsandbytes' layout")
    split = [f"{name} ({m.qweight.shape[-1]} wide, blocks of {m.qweight.block_size})"
             for name, m in model.named_modules()
             if isinstance(m, QuantLinear) and m.qweight.shape[-1] % m.qweight.block_size]
    if split:  # see the module docstring
        warnings.warn(f"{len(split)} layer(s) have rows that do not hold whole blocks: {layer_list(split)}; "
                      "bitsandbytes 0.50's CPU kernels on AVX-512 CPUs read them with the wrong scales (or fail "
                      "in inference); CUDA and CPUs without AVX-512 read them right", LowbitWarning, stacklevel=2)
    seen: set[tuple] = set()
    # an embedding kept narrow (lowbit.layers.keep_dtype) is written in the dtype the model computes in, as the
    # float table transformers' bitsandbytes loader expects beside the float layers
    narrow = {id(m.weight): m.compute_dtype for m in model.modules() if isinstance(m, NarrowEmbedding)}
    for key, t in model.state_dict(keep_vars=True).items():  # a QuantLinear's state is its bias alone
        where = (t.data_ptr(), t.numel())  # a tied tensor once: transformers ties it again from the config
        if where not in seen:
            seen.add(where)
            tensors[key] = t.detach().to(narrow.get(id(t), t.dtype))
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    config = with_architectures(model)
    config.quantization_config = _quantization_config(model, skip)
    if isinstance(model.get_output_embeddings(), QuantLinear):
        config.tie_word_embeddings = False  # a 4-bit head cannot share the float embedding's tensor
    with write_errors(out), atomic_dir(out) as tmp:
        save_tensors(tensors, tmp / WEIGHTS_FILE)
        config.save_pretrained(tmp)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return counts


def _quantization_config(model: nn.Module, skip: list[str]) -> dict:
    """transformers' BitsAndBytesConfig.to_dict() for what the layers hold. The quant type and
    double quant apply only to quantizing on load: a stored layer reads its own quant_state."""
    qs = [m.qweight for m in model.modules() if isinstance(m, QuantLinear)]
    types = [q.format.bnb_quant_type for q in qs]
    return {"quant_method": "bitsandbytes", "load_in_4bit": True, "load_in_8bit": False,
            "_load_in_4bit": True, "_load_in_8bit": False,
            "bnb_4bit_quant_type": max(set(types), key=types.count),
            "bnb_4bit_use_double_quant": any(q.double_quant for q in qs),
            "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
            # Exact names of the linear layers left in full precision (lm_head too, when it is one):
            # without a list transformers would quantize them on load.
            "llm_int8_skip_modules": skip, "llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False}


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_layers(tensors: dict[str, torch.Tensor], where: str) -> dict[str, QuantizedTensor]:
    """The 4-bit layers of a bitsandbytes state dict as lowbit tensors (layer name -> weight),
    their entries removed from ``tensors``. Anything lowbit would not have written the same
    way (another code table, nested block or map, a field it does not know) is refused rather
    than reinterpreted, in one line naming the layer and the field."""
    layers = {}
    for key in [k for k in tensors if STATE_KEY in k]:
        name, _, suffix = key.partition(f".weight.{STATE_KEY}")
        w = f"{name}.weight"
        try:
            state = tensors.pop(key)
            if state.dtype != torch.uint8 or state.dim() != 1:
                raise InputError(f"its {STATE_KEY}{suffix} is not the uint8 bytes of a JSON object")
            try:
                info = json.loads(bytes(state.numpy()).decode())
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise InputError(f"its {STATE_KEY}{suffix} is not JSON") from None
            parts = {p: tensors.pop(p) for p in list(tensors) if p.startswith(w + ".")}
            if w not in tensors:
                raise InputError(f"the file has no tensor {w}")
            layers[name] = _layer(w, _checked_state(info, suffix), parts | {"weight": tensors.pop(w)})
        except InputError as e:
            raise ModelLoadError(f"{where}: {w} is not a bitsandbytes 4-bit layer lowbit reads: {e}") from None
    return layers


_STATE_FIELDS = ("quant_type", "blocksize", "dtype", "shape")  # QuantState.as_dict(packed=True)'s non-tensors
_NESTED_FIELDS = ("nested_blocksize", "nested_dtype", "nested_offset")  # and with double quant
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # a layer's compute dtype


def _checked_state(info, suffix: str) -> dict:
    """The quant_state JSON, each field checked for type and value (InputError naming the first wrong one)."""
    if not isinstance(info, dict):
        raise InputError("its quant_state is not a JSON object")
    unknown = sorted(set(info) - set(_STATE_FIELDS) - set(_NESTED_FIELDS))
    missing = [f for f in _STATE_FIELDS if f not in info]
    nested = [f for f in _NESTED_FIELDS if f in info]
    if unknown or missing or len(nested) not in (0, len(_NESTED_FIELDS)):
        what = unknown or missing or sorted(set(_NESTED_FIELDS) - set(nested))
        raise InputError(f"its quant_state {'has unknown' if unknown else 'lacks'} field(s) {', '.join(what)}")
    by_type = {get_format(f).bnb_quant_type: get_format(f) for f in BNB_FORMATS}
    if not isinstance(info["quant_type"], str) or info["quant_type"] not in by_type:
        raise InputError(f"quant_state quant_type {info['quant_type']!r} (lowbit reads {', '.join(by_type)})")
    if info["quant_type"] != suffix:
        raise InputError(f"quant_state quant_type {info['quant_type']!r} differs from its key's {suffix!r}")
    if not _whole(info["blocksize"]) or info["blocksize"] not in BNB_BLOCKS:
        raise InputError(f"quant_state blocksize {info['blocksize']!r} (bitsandbytes' are "
                         f"{', '.join(map(str, BNB_BLOCKS))})")
    if info["dtype"] not in _DTYPES:
        raise InputError(f"quant_state dtype {info['dtype']!r} (lowbit reads {', '.join(_DTYPES)})")
    shape = info["shape"]
    if not (isinstance(shape, list) and len(shape) == 2 and all(_whole(d) and d > 0 for d in shape)):
        raise InputError(f"quant_state shape {shape!r} (a linear weight's [rows, columns], each at least 1)")
    if nested:
        offset = info["nested_offset"]
        if info["nested_blocksize"] != DQ_BLOCK or not _whole(info["nested_blocksize"]) or \
                info["nested_dtype"] != "float32" or not isinstance(offset, int | float) or \
                isinstance(offset, bool) or not math.isfinite(offset):
            raise InputError(f"its double quant is not bitsandbytes' (nested_blocksize {DQ_BLOCK}, nested_dtype "
                             "float32, a finite nested_offset)")
    return info


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _layer(w: str, info: dict, parts: dict[str, torch.Tensor]) -> QuantizedTensor:
    fmt = {get_format(f).bnb_quant_type: get_format(f) for f in BNB_FORMATS}[info["quant_type"]]
    quant_map = parts.get(f"{w}.quant_map")
    if quant_map is None or not torch.equal(quant_map.float(), torch.tensor(fmt.values, dtype=torch.float32)):
        raise InputError(f"its quant_map is not bitsandbytes' {info['quant_type']} table")
    double = "nested_offset" in info
    needed = [f"{w}.absmax"] + ([f"{w}.nested_absmax", f"{w}.nested_quant_map"] if double else [])
    extra = sorted(set(parts) - {"weight", f"{w}.quant_map", *needed})
    if [n for n in needed if n not in parts] or extra:
        raise InputError(f"its tensors are not those of a {'double-quantized ' if double else ''}layer: "
                         + (f"{extra[0]} is unexpected" if extra else
                            f"no {next(n for n in needed if n not in parts)}"))
    if double:
        if not torch.equal(parts[f"{w}.nested_quant_map"], dynamic_map()):
            raise InputError(f"its double quant is not bitsandbytes' (blocks of {DQ_BLOCK}, the dynamic map)")
        stored = {"codes": parts["weight"].reshape(-1), "scales_q": parts[f"{w}.absmax"],
                  "scales_absmax": parts[f"{w}.nested_absmax"],
                  "scales_offset": torch.tensor([float(info["nested_offset"])], dtype=torch.float32)}
    else:
        stored = {"codes": parts["weight"].reshape(-1), "scales": parts[f"{w}.absmax"]}
    q = QuantizedTensor(format=fmt, shape=torch.Size(info["shape"]), dtype=_DTYPES[info["dtype"]],
                        block_size=info["blocksize"], parts=stored, double_quant=double)
    try:
        return check_layout(q, w)
    except ModelLoadError as e:
        raise InputError(str(e).removeprefix(f"{w}: ")) from None


def read_checkpoint(directory: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, QuantizedTensor]]:
    """``(config dict, other tensors, 4-bit layers)`` of a bitsandbytes 4-bit checkpoint directory."""
    directory = Path(directory)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"not a model directory (config.json: {e})") from None
    qc = config.get("quantization_config") or {}
    if qc.get("quant_method") != "bitsandbytes" or not (qc.get("load_in_4bit") or qc.get("_load_in_4bit")):
        raise ModelLoadError(f"{directory}: config.json has no bitsandbytes 4-bit quantization_config "
                             f"(lowbit imports bitsandbytes' 4-bit checkpoints and GGUF files)")
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{directory}: no .safetensors files (lowbit never loads pickled .bin checkpoints)")
    tensors = {}
    for f in files:
        check_safetensors(f)  # from its header alone, before safetensors maps it
        with as_load_error(f):
            tensors |= load_file(f)
    return config, tensors, read_layers(tensors, str(directory))
