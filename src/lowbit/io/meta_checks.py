"""Every field of a lowbit.json that lowbit reads, checked when it is read: a file edited by hand (or
by an adversary) is refused in one line naming the field, instead of loading as something else
("yes" taken for true, a format name that disagrees with its id, a source that climbs out with '..').

The fields are those ``model_io.save_quantized`` writes; checks of the stored tensors against the
layers (``check_layout``) happen when the tensors are read.
"""

from __future__ import annotations

import math
import re
from pathlib import PurePosixPath, PureWindowsPath

from ..errors import ModelLoadError
from ..formats.registry import format_by_id
from ..models.loader import CAUSAL_LM, EMBEDDED, ENCODER

KEEP_DTYPES = ("float32", "float16", "bfloat16")  # nn.keep_dtype's choices: what a layer's dtype may be too
# a hub id: "name" or "org/name" of letters, digits, '-', '_', '.' (huggingface_hub's validate_repo_id)
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class _Bad(Exception):
    """(field, what it must be): turned into one ModelLoadError line by check_meta."""


def check_meta(meta: dict, where) -> None:
    """Raise ModelLoadError naming the first field of ``meta`` (read from ``where``) lowbit cannot use."""
    try:
        _model(_section(meta, "model"))
        _config(_section(meta, "config"))
        _quantize(_section(meta, "quantize"))
        for name, layer in _section(meta, "layers").items():
            _layer(f"layers.{name}", layer)
        for alias, target in _section(meta, "tied").items():
            _text(f"tied.{alias}", target)
        if "files" in meta and not (isinstance(meta["files"], list) and all(_name(n) for n in meta["files"])):
            raise _Bad("files", "a list of file names")
    except _Bad as e:
        field, rule = e.args
        raise ModelLoadError(f"corrupt {where}: {field} must be {rule}") from None


def _section(meta: dict, key: str) -> dict:
    if not isinstance(meta.get(key), dict):
        raise _Bad(key, "an object")
    return meta[key]


def _model(model: dict) -> None:
    if set(model) - {"kind", "source", "file_hash", "name"} or not {"kind", "source", "file_hash"} <= set(model):
        raise _Bad("model", "an object of kind, source, file_hash and name")
    if model["kind"] not in (CAUSAL_LM, ENCODER):
        raise _Bad("model.kind", f"{CAUSAL_LM!r} or {ENCODER!r}, not {model['kind']!r}")
    if not isinstance(model["file_hash"], str) or not _SHA256.fullmatch(model["file_hash"]):
        raise _Bad("model.file_hash", "64 lowercase hex digits (a sha256)")
    _text("model.name", model.get("name", ""))
    source = model["source"]
    if not (isinstance(source, str) and (source in EMBEDDED or _absolute(source) or _HUB_ID.fullmatch(source))) \
            or ".." in str(source).replace("\\", "/").split("/"):
        raise _Bad("model.source", f"an embedded model's name ({', '.join(EMBEDDED)}), an absolute path without "
                                   f"'..', or a hub id (org/name), not {str(source)[:80]!r}")


def _absolute(source: str) -> bool:
    return PurePosixPath(source).is_absolute() or PureWindowsPath(source).is_absolute()


def _config(config: dict) -> None:
    _text("config.label", config.get("label"))
    _flag("config.double_quant", config.get("double_quant"))
    if "keep_dtype" in config and config["keep_dtype"] not in KEEP_DTYPES:
        raise _Bad("config.keep_dtype", f"one of {', '.join(KEEP_DTYPES)}, not {config['keep_dtype']!r}")


def _quantize(stored: dict) -> None:
    for key in ("bits_per_weight", "seconds"):
        value = stored.get(key)
        if not _number(value) or value < 0:
            raise _Bad(f"quantize.{key}", f"a finite number >= 0, not {value!r}")
    for key in ("model_bytes_before", "model_bytes_after"):
        if key in stored or key == "model_bytes_before":
            _count(f"quantize.{key}", stored.get(key), minimum=0)


def _layer(field: str, layer) -> None:
    if not isinstance(layer, dict):
        raise _Bad(field, "an object")
    for key in ("format", "format_id", "shape", "dtype", "block_size", "double_quant", "parts"):
        if key not in layer:
            raise _Bad(f"{field}.{key}", "present")
    _count(f"{field}.format_id", layer["format_id"], minimum=0)
    try:
        fmt = format_by_id(layer["format_id"])
    except (KeyError, ValueError):
        raise _Bad(f"{field}.format_id", f"a format id this lowbit knows, not {layer['format_id']}") from None
    if layer["format"] != fmt.name:  # a swapped or unknown name: the id decides how bytes are read
        raise _Bad(f"{field}.format", f"{fmt.name!r}, the name of format id {fmt.id}, not {layer['format']!r}")
    shape = layer["shape"]
    if not isinstance(shape, list) or len(shape) != 2:
        raise _Bad(f"{field}.shape", f"[rows, columns], not {shape!r}")
    for d in shape:
        _count(f"{field}.shape", d, minimum=1)
    if layer["dtype"] not in KEEP_DTYPES:
        raise _Bad(f"{field}.dtype", f"one of {', '.join(KEEP_DTYPES)}, not {layer['dtype']!r}")
    _count(f"{field}.block_size", layer["block_size"], minimum=1)
    _flag(f"{field}.double_quant", layer["double_quant"])
    parts = layer["parts"]
    if not (isinstance(parts, list) and parts and all(_name(p) for p in parts) and len(set(parts)) == len(parts)):
        raise _Bad(f"{field}.parts", "a list of distinct part names")
    for key in ("label", "fallback_from", "rotation"):
        if key in layer:
            _text(f"{field}.{key}", layer[key])


def _text(field: str, value) -> None:
    if not isinstance(value, str):
        raise _Bad(field, f"a string, not {value!r}"[:120])


def _name(value) -> bool:
    return isinstance(value, str) and bool(value) and "/" not in value and "\\" not in value and value != ".."


def _flag(field: str, value) -> None:
    if not isinstance(value, bool):
        raise _Bad(field, f"true or false, not {value!r}"[:120])


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _count(field: str, value, *, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _Bad(field, f"a whole number >= {minimum}, not {value!r}"[:120])
