"""Which kind of lowbit JSON a file holds, and reading one of the kinds a command expects (one line if not)."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import InputError
from .result_schema import validate

# kind -> what it is, in the words of an error message
KINDS = {
    "compare": "a `lowbit compare --json` report",
    "bench": "a benchmarks/bench_quality.py --json report",
    "errors": "a `lowbit errors --json` report",
    "outliers": "a `lowbit outliers --json` report",
    "plan": "a per-layer plan (`lowbit quantize --plan` file)",
    "saved": "a quantized model's lowbit.json",
    "sensitivity": "a `lowbit sensitivity --json` table",
    "row": "one result row of a `lowbit compare --json` report",
}


def json_kind(data) -> str | None:
    """Which of ``KINDS`` ``data`` is (by its keys), or None."""
    if not isinstance(data, dict):
        return None
    if isinstance(data.get("results"), list):
        return "compare"
    if isinstance(data.get("rows"), list):
        return "bench"
    if "threshold" in data and isinstance(data.get("features"), list):
        return "outliers"
    if isinstance(data.get("formats"), list) and isinstance(data.get("layers"), list):
        return "errors"
    if isinstance(data.get("rules"), list):
        return "plan"
    if "lowbit_layout" in data:
        return "saved"
    if "candidates" in data and "anchor" in data:
        return "sensitivity"
    if "format" in data and ("bits_per_weight" in data or "error" in data):
        return "row"
    return None


def read_json(path: str, command: str, expected: tuple[str, ...]) -> dict:
    """The JSON at ``path`` (a directory: its lowbit.json), if it is of an ``expected`` kind; else one line
    saying what it is."""
    file = Path(path)
    if file.is_dir() and (file / "lowbit.json").is_file():
        file = file / "lowbit.json"
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror or e}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not JSON ({e})") from None
    kind = json_kind(data)
    if kind not in expected:
        wanted = " or ".join(KINDS[k] for k in expected)
        raise InputError(f"{path} is {describe(data)}; `{command}` reads {wanted}")
    validate(data, kind, str(path))  # a wrong-typed field: one line naming it, not a TypeError in a figure
    return data


def describe(data) -> str:
    kind = json_kind(data)
    if kind is not None:
        return KINDS[kind]
    if isinstance(data, dict):
        keys = ", ".join(list(data)[:6])
        return f"a JSON object of no kind lowbit writes (keys: {keys})" if keys else "an empty JSON object"
    return f"a JSON {type(data).__name__.replace('dict', 'object').replace('list', 'array')}, not an object"
