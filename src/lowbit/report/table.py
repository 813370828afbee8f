"""The table `lowbit compare` and `lowbit eval` print: one row per format, reference first."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

_MB = 1e6

# (header, result key, format spec), in the order printed. Each column is data, so the
# printer holds no per-metric code; what a result lacks prints as "-".
_COMMON = [("format", "format", ""), ("bits/weight", "bits_per_weight", ".3f"), ("weights MB", "weight_mb", ".1f"),
           ("quantize s", "quantize_seconds", ".2f")]
_CAUSAL = [("PPL", "ppl", ".3f"), ("KL mean", "kl_mean", ".5f"), ("KL median", "kl_median", ".5f"),
           ("KL p99", "kl_p99", ".4f"), ("KL max", "kl_max", ".3f"), ("same top-1", "top1", ".2%")]
_ENCODER = [("1-cos mean", "cos_dist_mean", ".2e"), ("1-cos max", "cos_dist_max", ".2e")]
# dropped first when the terminal is too narrow (the format name, PPL and KL mean always stay)
_DROP_ORDER = ("KL max", "KL median", "quantize s", "weights MB", "KL p99", "same top-1", "bits/weight")
_PERFECT = {"kl_mean": 0.0, "kl_median": 0.0, "kl_p99": 0.0, "kl_max": 0.0, "top1": 1.0, "cos_dist_mean": 0.0,
            "cos_dist_max": 0.0}


def compare_table(report: dict, width: int | None = None) -> Table:
    """``report``: the dict ``lowbit.evaluate.compare`` returns (also the JSON file). With
    ``width``, low-priority columns are left out until the table fits: numbers are never cut."""
    columns, rows = table_data(report)
    title = f"{report['model']['name']}: {scope(report['protocol'])}"
    dropped: list[str] = []
    table = _build(title, columns, rows)
    for header in _DROP_ORDER:
        if width is None or _width(table) <= width:
            break
        columns = [c for c in columns if c[0] != header]
        dropped.append(header)
        table = _build(title, columns, rows)
    notes = [f"{r['format']}: not scored: {r['error']}" for r in report["results"] if "error" in r]
    if dropped:
        notes.append(f"left out at this width: {', '.join(dropped)} (all columns are in --json)")
    table.caption = "\n".join(notes) or None
    table.caption_justify = "left"
    return table


def scope(protocol: dict) -> str:
    """What was scored, in words: "16 windows x 512 tokens of pydoc_data.topics"."""
    if protocol["kind"] == "causal-lm":
        return f"{protocol['windows']} windows x {protocol['window']} tokens of {protocol['text']}"
    return f"{protocol['sentences']} paragraphs of {protocol['text']}"


def table_data(report: dict) -> tuple[list[tuple[str, str, str]], list[dict]]:
    """(columns as (header, key, format spec), rows: the reference first) of a compare report."""
    causal = report["protocol"]["kind"] == "causal-lm"
    ref = {"format": "reference", "bits_per_weight": 32, **_PERFECT, **report["reference"]}
    rows = [ref, *report["results"]]
    rows = [{**row, "weight_mb": row["weight_bytes"] / _MB} if "weight_bytes" in row else row for row in rows]
    return _COMMON + (_CAUSAL if causal else _ENCODER), rows


def cell(value, spec: str) -> str:
    if value is None:
        return "-"
    return value if isinstance(value, str) else format(value, spec)


def _build(title: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> Table:
    table = Table(title=title)
    for header, _, _ in columns:
        table.add_column(header, justify="left" if header == "format" else "right", no_wrap=True)
    for i, row in enumerate(rows):
        table.add_row(*(cell(row.get(key), spec) for _, key, spec in columns), style="dim" if i == 0 else None)
    return table


def _width(table: Table) -> int:
    console = Console(width=10_000)
    return Measurement.get(console, console.options, table).maximum


def layer_notes(report: dict) -> list[str]:
    """A line per row quantized with more than one format or with fallbacks: what its layers are;
    and per LLM.int8() row, the share of input columns that took the float path.

    ``"plan[q4_k|q8_0]: 120 q4_k, 90 q8_0 (fell back from q4_k: its shape cannot hold it)"``.
    """
    lines = []
    for row in report["results"]:
        if "float_path_share" in row:
            lines.append(f"{row['format']}: {row['float_path_share']:.3%} of the input columns of its layers' calls "
                         "took the float path (LLM.int8()'s outliers)")
        counts, fallbacks = row.get("layer_formats") or {}, row.get("fallbacks") or {}
        if len(counts) < 2 and not fallbacks:
            continue
        line = f"{row['format']}: " + ", ".join(f"{n} {label}" for label, n in counts.items())
        if fallbacks:
            wanted = {}
            for name, label in fallbacks.items():
                wanted.setdefault(label, []).append(name)
            line += "; " + "; ".join(f"{len(names)} fell back from {label} (its shape cannot hold it: e.g. {names[0]})"
                                     for label, names in wanted.items())
        lines.append(line)
    return lines
