"""Export a lowbit model to a GGUF file that llama.cpp runs: lowbit's bytes, GGUF's names.

Each quantized layer of a GGUF type is written as its stored block bytes, rows in GGUF's
order; unquantized tensors (embedding, norms, any layer left in full precision) as F32.
The metadata (architecture numbers, tokenizer, chat template) is copied from the GGUF file
the model was loaded from, the way gguf-py's gguf_new_metadata.py copies it; models loaded
from other sources are refused for now (a GGUF tokenizer block has to be built from the HF
tokenizer, which llama.cpp's convert_hf_to_gguf.py does per tokenizer family).

Llama's q and k rows: transformers' GGUF loader un-permutes them on load (RoPE pairs
interleaved in GGUF, split in halves in transformers), so they are permuted back here, as
convert_hf_to_gguf.py's LlamaModel.permute does. A row of a GGUF type holds whole blocks,
so permuting rows moves bytes and changes none.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import LowbitError
from ..files.atomic import atomic_file, write_errors
from ..formats.registry import formats, get_format
from ..formats.spec import FormatSpec
from ..layers.linear import QuantLinear
from ..models.loader import resolve

GGUF_TYPES = tuple(f for f in formats() if get_format(f).gguf_type)  # formats.table's gguf_type column
SUPPORTED_ARCHS = ("llama",)
# gguf-py's Keys.General.QUANTIZED_BY: set to "lowbit" in every file export_gguf writes, so that --overwrite
# can tell an earlier export from any other file
QUANTIZED_BY, LOWBIT = "general.quantized_by", "lowbit"
GGUF_MAGIC = b"GGUF"  # the first 4 bytes of every GGUF file (gguf-py constants.GGUF_MAGIC, little-endian)


class ExportError(LowbitError, ValueError):
    """The model cannot be written in the target layout; nothing was written."""


def gguf_type(spec: FormatSpec):
    """The GGMLQuantizationType of a lowbit GGUF format (formats.table's gguf type name)."""
    import gguf

    return gguf.GGMLQuantizationType[spec.gguf_type]


def check_exportable(model: nn.Module) -> None:
    """Raise ExportError naming every layer GGUF cannot hold as lowbit stores it."""
    bad = []
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            fmt = module.qweight.format
            if fmt.gguf_type is None:
                bad.append(f"{name} ({fmt.name})")
            elif module.signs is not None:
                bad.append(f"{name} ({fmt.name}+had: the rotation has no GGUF form)")
    if bad:
        raise ExportError(f"GGUF holds the types {', '.join(GGUF_TYPES)}; {len(bad)} layer(s) are in other formats: "
                          f"{layer_list(bad)}")


def layer_list(items: list[str], shown: int = 4) -> str:
    """The first ``shown`` of ``items`` and how many more: an error line stays one line."""
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def source_gguf(source: str) -> Path:
    how, target = resolve(source)
    if how != "gguf":
        raise ExportError(f"GGUF export copies the tokenizer and metadata from the GGUF file the model was loaded "
                          f"from; {source} is not one (export models quantized from a .gguf or the embedded SmolLM2)")
    return Path(target)


def is_lowbit_gguf(path: str | Path) -> bool:
    """Whether ``path`` is a GGUF file ``export_gguf`` wrote: its metadata says ``general.quantized_by = lowbit``."""
    import gguf

    try:
        with open(path, "rb") as f:
            if f.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
                return False
        field = gguf.GGUFReader(path).fields.get(QUANTIZED_BY)
        return field is not None and field.contents() == LOWBIT
    except Exception:  # noqa: BLE001 - whatever a damaged or foreign file makes the reader raise, it is not ours
        return False


def check_gguf_output(out: str | Path, *, overwrite: bool = False) -> None:
    """A one-line error if ``out`` exists, unless ``overwrite`` and it is an earlier lowbit export."""
    out = Path(out)
    if not out.exists():
        return
    if not overwrite:
        raise FileExistsError(f"output exists: {out} (pass --overwrite to replace a GGUF file lowbit wrote)")
    if not is_lowbit_gguf(out):
        raise FileExistsError(f"--overwrite replaces only a GGUF file lowbit wrote ({QUANTIZED_BY} = {LOWBIT}); "
                              f"{out} is not one")


def export_gguf(model: nn.Module, source: str, out: str | Path, *, overwrite: bool = False) -> dict:
    """Write ``model`` (loaded from the GGUF ``source``) to ``out``; returns counts per tensor type.
    An existing ``out`` is replaced only with ``overwrite`` and only if lowbit wrote it (``check_gguf_output``)."""
    import gguf

    check_gguf_output(out, overwrite=overwrite)
    check_exportable(model)
    reader = gguf.GGUFReader(source_gguf(source))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if arch not in SUPPORTED_ARCHS or getattr(model.config, "model_type", None) not in SUPPORTED_ARCHS:
        raise ExportError(f"GGUF export knows the architectures {', '.join(SUPPORTED_ARCHS)}; this model is {arch}")
    cfg = model.config
    tensors = _tensors(model, gguf_tensor_names(model), cfg)
    counts: dict[str, int] = {}
    out = Path(out)
    # write_errors inside atomic_file: a short write is judged while the temp file still holds its space
    with atomic_file(out, overwrite=overwrite, replaceable=is_lowbit_gguf) as tmp, write_errors(out):
        writer = gguf.GGUFWriter(tmp, arch)
        _copy_metadata(reader, writer)
        writer.add_string(QUANTIZED_BY, LOWBIT)
        for name, (array, raw_type) in tensors.items():
            writer.add_tensor(name, array, raw_dtype=raw_type)
            key = raw_type.name if raw_type is not None else "F32"
            counts[key] = counts.get(key, 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return counts


def _copy_metadata(reader, writer) -> None:
    import gguf

    # the writer adds the architecture; types differ now; export_gguf says who quantized it
    skip = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, QUANTIZED_BY}
    for field in reader.fields.values():
        if field.name in skip or field.name.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)


def _tensors(model, names, cfg) -> dict[str, tuple[np.ndarray, object]]:
    """GGUF name -> (array, GGML type or None for F32), in the model's order."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight if isinstance(model.lm_head, nn.Linear) else False
    out: dict[str, tuple[np.ndarray, object]] = {}
    done: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, QuantLinear | nn.Linear):
            if name == "lm_head" and tied:
                continue  # llama.cpp reads the output from token_embd when output.weight is absent
            out[_name(names, name)] = _linear(module, name, cfg)
            done.update(id(p) for p in module.parameters())
    for name, p in model.named_parameters():
        if id(p) in done:
            continue
        out[_name(names, name.removesuffix(".weight"))] = (p.detach().float().contiguous().numpy(), None)
    return out


def _name(names, hf: str) -> str:
    got = names(hf)
    if got is None:
        raise ExportError(f"no GGUF name for {hf}")
    return got


def gguf_tensor_names(model: nn.Module):
    """A function from a Llama model's module name to its weight's GGUF tensor name (None if it has none)."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, model.config.num_hidden_layers)
    return lambda hf: names.get_name(hf + ".weight", try_suffixes=(".weight", ".bias"))


def _heads(name: str, cfg) -> int | None:
    """The head count whose RoPE pairs GGUF interleaves in this layer's rows (q and k only)."""
    leaf = name.rsplit(".", 1)[-1]
    return {"q_proj": cfg.num_attention_heads, "k_proj": cfg.num_key_value_heads}.get(leaf)


def from_gguf_rows(rows: torch.Tensor, name: str, cfg) -> torch.Tensor:
    """A GGUF tensor's rows in transformers' order: the inverse of _permute for q and k, else as they are."""
    heads = _heads(name, cfg)
    if heads is None:
        return rows
    n = rows.shape[0]
    return rows.reshape(heads, n // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _linear(module, name: str, cfg):
    perm = _heads(name, cfg)
    if isinstance(module, QuantLinear):
        q = module.qweight
        rows = q.parts["data"].reshape(q.shape[0], -1)  # (out, bytes per row): whole blocks per row
        if perm:
            rows = _permute(rows, perm)
        return rows.contiguous().numpy(), gguf_type(q.format)
    w = module.weight.detach().float()
    return (_permute(w, perm) if perm else w).contiguous().numpy(), None


def _permute(rows: torch.Tensor, n_head: int) -> torch.Tensor:
    """convert_hf_to_gguf.py's LlamaModel.permute on the first dimension: halves -> pairs."""
    n = rows.shape[0]
    return rows.reshape(n_head, 2, n // n_head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
