"""What each kind of lowbit result JSON holds, as data, and one small checker of it (no dependency).

``lowbit plot`` and ``lowbit report`` read JSON a user may have edited or written by hand; a field of the wrong
type (``"bits_per_weight": "x"``, ``"kl_mean": [1]``, ``"results": [1, 2]``) must be one line naming the file, the
place (``results[3].kl_mean``) and what belongs there, not a TypeError deep in a figure. A schema lists the fields
the report and the plots read, with their types; any other field is allowed (a newer lowbit may add some), and a
field is checked only where it is present unless it is required.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..errors import InputError

# the most layers a count may say: a plan figure draws a bar per layer. DeepSeek-V3 has about 47,000 linear layers
# (61 blocks x 256 experts x 3 projections, arXiv 2412.19437); a made-up 10^9 would build a billion bars.
MAX_LAYERS = 100_000

# leaf types, by the name an error message gives them
_LEAVES = {
    "layers": lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_LAYERS,
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "count": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "anything": lambda v: True,
}
_WORDS = {"layers": f"a layer count from 0 to {MAX_LAYERS:,}",
          "string": "a string", "integer": "an integer", "count": "a whole number >= 1",
          "number": "a finite number", "boolean": "true or false",
          "null": "null", "anything": "anything"}


@dataclass(frozen=True)
class Obj:
    """A JSON object: ``fields`` by name; ``required`` must be present (only when ``unless`` is absent: a failed
    row has an ``error`` instead of its scores); ``values``: the schema of every value of a mapping whose keys
    are names (a row's ``layer_formats``)."""

    fields: dict = field(default_factory=dict)
    required: tuple[str, ...] = ()
    unless: str | None = None
    values: object = None


@dataclass(frozen=True)
class Arr:
    """A JSON array of ``items``."""

    items: object


@dataclass(frozen=True)
class Maybe:
    """``schema``, or null."""

    schema: object


def check(data, schema, file: str, path: str = "") -> None:
    """``data`` against ``schema`` (a leaf name such as ``"number|null"``, an ``Obj`` or an ``Arr``); the first
    mismatch is an InputError: ``r.json: results[3].kl_mean is an array, expected a finite number or null``."""
    if isinstance(schema, Maybe):
        if data is not None:
            check(data, schema.schema, file, path)
    elif isinstance(schema, str):
        kinds = schema.split("|")
        if not any(_LEAVES[k](data) for k in kinds):
            _fail(file, path, data, " or ".join(_WORDS[k] for k in kinds))
    elif isinstance(schema, Arr):
        if not isinstance(data, list):
            _fail(file, path, data, "an array")
        for i, item in enumerate(data):
            check(item, schema.items, file, f"{path}[{i}]")
    else:
        if not isinstance(data, dict):
            _fail(file, path, data, "an object")
        if schema.unless is None or schema.unless not in data:
            for key in schema.required:
                if key not in data:
                    raise InputError(f"{file}: {_join(path, key)} is missing" +
                                     (f" (a row without {schema.unless!r} holds it)" if schema.unless else ""))
        for key, value in data.items():
            sub = schema.fields.get(key, schema.values)
            if sub is not None:
                check(value, sub, file, _join(path, key))


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _fail(file: str, path: str, value, expected: str):
    raise InputError(f"{file}: {path or 'the top level'} is {_found(value)}, expected {expected}")


def _found(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()}"
    if isinstance(value, str):
        text = value if len(value) <= 24 else value[:21] + "..."
        return f"the string {text!r}"
    if isinstance(value, int | float):
        return f"the number {value!r}"
    return "an array" if isinstance(value, list) else "an object"


# --- the schemas, by result_json.KINDS --------------------------------------------------------------------------

_SCORE = "number|null"  # JSON's null: a non-finite score (lowbit.files.atomic.write_json)
ROW = Obj({
    "format": "string", "error": "string", "bits_per_weight": "number", "weight_bytes": "number",
    "block_size": "integer|null", "double_quant": "boolean", "quantized_layers": "integer", "tokens": "integer",
    "quantize_seconds": "number|null", "eval_seconds": "number|null", "float_path_share": "number|null",
    **{k: _SCORE for k in ("ppl", "kl_mean", "kl_median", "kl_p99", "kl_max", "top1", "cos_dist_mean",
                           "cos_dist_max")},
    "layer_formats": Obj(values="layers"), "fallbacks": Obj(values="string"), "peer": "boolean",
    # the distribution of per-token KL (lowbit.eval.causal.kl_quantiles) and per-layer weight SQNR
    "kl_quantiles": Obj({"q": Arr("number"), "kl": Arr(_SCORE)}, required=("q", "kl")),
    "layer_sqnr": Obj({"layers": Arr("string"), "sqnr_db": Arr(_SCORE)}, required=("layers", "sqnr_db")),
}, required=("format",))
_MODEL = Obj({"name": "string", "source": "string|null", "file_hash": "string|null", "kind": "string"},
             required=("name",))
_PROTOCOL = Obj({"kind": "string", "text": "string", "window": "integer", "windows": "integer",
                 "sentences": "integer"}, required=("kind",))
_REPORT = {"model": _MODEL, "protocol": _PROTOCOL, "lowbit_version": "string", "date": "string",
           "versions": Obj(values="string"), "keep_dtype": "string",
           "reference": Obj({"weight_bytes": "number", "ppl": _SCORE}),
           "calibration": Obj({"windows": "integer", "seconds": "number"})}
_ERRORS_FORMAT = Obj({"format": "string", "error": "string", "bits_per_weight": "number",
                      "mean_sqnr_db": _SCORE, "min_sqnr_db": _SCORE, "min_layer": "string|null",
                      "layers": Arr(Obj({"sqnr_db": _SCORE}))},
                     required=("format", "bits_per_weight", "mean_sqnr_db", "min_sqnr_db", "layers"), unless="error")
_SAVED_LAYER = Obj({"label": "string", "format": "string", "block_size": "integer|null", "double_quant": "boolean"},
                   required=("format",))

SCHEMAS = {
    "compare": Obj({**_REPORT, "results": Arr(ROW)}, required=("results",)),
    "bench": Obj({**_REPORT, "rows": Arr(ROW), "llama_cpp": Maybe(Arr(ROW))}, required=("rows",)),
    "row": ROW,
    "errors": Obj({"model": _MODEL, "layers": Arr(Obj({"name": "string"}, required=("name",))),
                   "formats": Arr(_ERRORS_FORMAT)}, required=("layers", "formats")),
    "outliers": Obj({"model": _MODEL, "threshold": "number", "systematic": Arr("integer"),
                     "hidden_inputs": Arr("string"),
                     "criteria": Obj({"layer_share": "number", "position_share": "number"}),
                     "layers": Arr(Obj({"name": "string", "shares_input_with": "string|null",
                                        "dims": Arr(Obj({"dim": "integer"}, required=("dim",)))},
                                       required=("name", "dims")))},
                    required=("threshold", "layers")),
    "plan": Obj({"name": "string|null", "rules": Arr(Obj({"pattern": "string", "format": "string",
                                                          "keep": "boolean"}, required=("pattern",)))},
                required=("rules",)),
    "saved": Obj({"layers": Obj(values=_SAVED_LAYER), "config": Obj({"label": "string"}, required=("label",)),
                  "quantize": Obj({"bits_per_weight": "number"})}, required=("layers", "config")),
    "sensitivity": Obj({"layers": Arr(Obj({"name": "string", "numel": "count",
                                           "costs": Obj(values=Obj({"bytes": "integer"}, required=("bytes",)))},
                                          required=("name", "numel")))}),
}


def validate(data, kind: str, file: str) -> None:
    """``data``, of ``kind``, against its schema; a kind without one passes."""
    if kind in SCHEMAS:
        check(data, SCHEMAS[kind], file)
