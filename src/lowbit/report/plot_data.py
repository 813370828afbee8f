"""What the plots (``lowbit.report.plots``) draw, taken from result JSON (``lowbit.report.result_json``).

No matplotlib here: these functions turn what the commands write (``lowbit compare/errors/outliers --json``, a
plan, ``benchmarks/bench_quality.py --json``) into plain lists. A layer's levels, drawn from a weight tensor,
are computed by ``lowbit.workflows.levels``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from ..errors import InputError
from ..formats.facts import probe
from ..planning.config import QuantConfig
from .result_json import describe, json_kind

# --- KL (or encoder error) against bits -------------------------------------------------------------------------

# (key, axis label, what a point is called in the title), causal LMs first
METRICS = (("kl_mean", "mean KL divergence to the original (nats, log scale)", "mean KL divergence"),
           ("cos_dist_mean", "mean cosine distance of embeddings to the original (1 − cos, log scale)",
            "mean cosine distance"))
PEER_GROUPS = (("bitsandbytes", "bitsandbytes"), ("hqq", "hqq"), ("gguf", "gguf-py"), ("llama.cpp", "llama.cpp"))


@dataclass(frozen=True)
class Point:
    label: str
    bits: float
    value: float
    group: str = "lowbit"  # or a peer group of PEER_GROUPS


def metric_for(rows: list[dict]) -> tuple[str, str, str]:
    """``METRICS`` entry of the first metric some row holds (KL for causal LMs, cosine distance for encoders)."""
    for metric in METRICS:
        if any(r.get(metric[0]) is not None for r in rows):
            return metric
    raise InputError("no row holds a score (kl_mean, or cos_dist_mean for an encoder): nothing to plot")


def result_rows(report) -> list[dict]:
    """The lowbit rows of a compare report (``results``), of a bench report (its non-peer ``rows``) or a list."""
    if isinstance(report, list):
        return report
    if json_kind(report) == "bench":
        return [r for r in report["rows"] if not r.get("peer")]
    if json_kind(report) == "row":
        return [report]
    return list(report.get("results") or [])


def peer_rows(peers) -> list[dict]:
    """A bench report's peer rows and llama.cpp rows; of a list of rows, those marked ``peer`` or from llama.cpp
    (all of them if none is: a list of peers)."""
    if peers is None:
        return []
    if isinstance(peers, dict):
        peers = list(peers.get("rows") or []) + list(peers.get("llama_cpp") or [])
    marked = [r for r in peers if r.get("peer") or "llama.cpp" in str(r.get("format"))]
    return marked if marked else list(peers)


def peer_group(name: str) -> str:
    lower = name.lower()
    return next((group for key, group in PEER_GROUPS if key in lower), "peer")


def short_name(name: str) -> str:
    """A peer row's name without the ``(llama.cpp, measured separately, ...)`` note, prefixed by its tool."""
    name = re.sub(r"\s*\(llama\.cpp[^)]*\)", "", name).strip()
    return f"llama.cpp {name}" if peer_group(name) == "peer" and "imatrix" in name.lower() else name


def points(rows: list[dict], key: str, group: str | None = None) -> tuple[list[Point], list[str]]:
    """Rows that can go on a log axis, and a note for each that cannot (error, no score, a score of 0).
    ``group`` None: peers' rows, each in its ``peer_group``."""
    out, notes = [], []
    for r in rows:
        label = str(r.get("format", "?"))
        value, bits = r.get(key), r.get("bits_per_weight")
        if "error" in r:
            notes.append(f"{label}: not scored")
        elif value is None or bits is None:
            notes.append(f"{label}: no {key}")
        elif not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
            notes.append(f"{label}: {key} {value:g} (not on a log axis)")
        else:
            g = group or peer_group(label)
            out.append(Point(label if group else short_name(label), float(bits), float(value), g))
    return out, notes


@dataclass(frozen=True)
class KLPoints:
    metric: tuple[str, str, str]  # a METRICS entry
    points: list[Point]  # lowbit's rows
    peers: list[Point]
    keep: list[tuple[str, float]]  # the ``keep <dtype>`` rows that can go on a log axis: a floor, drawn as a line
    notes: list[str]  # what is not drawn, and why


def kl_points(report, peers=None) -> KLPoints:
    """The points of ``plots.kl_vs_bits``: a compare report's rows (or a bench report's lowbit rows), ``peers``'
    (a bench report's peer and llama.cpp rows; a bench report given as ``report`` brings its own)."""
    rows = result_rows(report)
    if peers is None and json_kind(report) == "bench":
        peers = report
    others = peer_rows(peers)
    keep = [r for r in rows if is_keep_row(r) and "error" not in r]
    rows = [r for r in rows if not is_keep_row(r)]
    metric = metric_for(rows + others + keep)
    pts, notes = points(rows, metric[0], group="lowbit")
    peer_pts, peer_notes = points(others, metric[0])
    if not pts and not peer_pts:
        raise InputError(f"no row has a positive {metric[0]} and bits per weight: nothing goes on a log axis")
    floors, keep_notes = points(keep, metric[0], group="keep")
    return KLPoints(metric, pts, peer_pts, [(p.label, p.value) for p in floors], notes + peer_notes + keep_notes)


def is_keep_row(row: dict) -> bool:
    """``keep bfloat16``: the unquantized tensors rounded alone, no layer quantized (``evaluate.compare``)."""
    return str(row.get("format", "")).startswith("keep ")


def pareto_front(pts: list[Point]) -> list[Point]:
    """The points with a lower value than every point of fewer (or as many) bits, by bits."""
    front: list[Point] = []
    for p in sorted(pts, key=lambda p: (p.bits, p.value)):  # of equal bits the lowest value comes first
        if not front or p.value < front[-1].value:
            front.append(p)
    return front


def spread(ys: list[float], step: float, low: float, high: float) -> list[float]:
    """Sorted label heights moved apart to at least ``step``, each group of labels centred on its points' mean
    height, all kept in [low, high] (``plots.kl_vs_bits`` stacks a column's labels so)."""
    groups: list[list[float]] = []

    def start(g):
        return min(max(sum(g) / len(g) - (len(g) - 1) * step / 2, low), high - (len(g) - 1) * step)

    for y in ys:
        groups.append([y])
        while len(groups) > 1 and start(groups[-1]) - (start(groups[-2]) + (len(groups[-2]) - 1) * step) < step:
            groups[-2:] = [groups[-2] + groups[-1]]
    return [start(g) + k * step for g in groups for k in range(len(g))]


# --- SQNR per layer and format ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Grid:
    rows: list[str]  # layer (or layer kind) names, then "mean" and "worst layer" when grouped
    formats: list[str]  # "nf4\n4.50 b/w\nmean 20.6 dB"
    values: list[list[float]]  # rows x formats, SQNR dB; nan where not finite or not measured
    worst: list[int | None]  # per format, the row of its worst layer (or of that layer's kind)
    grouped: bool
    notes: list[str]
    means: list[float]  # per format, its mean SQNR over all layers (dB)


def _db_text(value) -> str:
    """A dB figure as text; JSON's null (an exact layer's inf SQNR) and non-finite ones are "n/a"."""
    db = _db(value)
    return f"{db:.1f} dB" if math.isfinite(db) else "n/a"


def _db(value) -> float:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else math.nan


def layer_kind(name: str) -> str:
    return ".".join("*" if part.isdigit() else part for part in name.split("."))


def sqnr_grid(report: dict, per_layer: bool | None = None, max_rows: int = 48) -> Grid:
    """Layers x formats SQNR (dB) of a ``lowbit errors --json`` report. ``per_layer`` None: one row per layer
    when there are at most ``max_rows`` layers, else one per layer kind (its layers' mean, as ``lowbit errors``
    prints it) with the mean and the worst layer below."""
    ok = [f for f in report["formats"] if "error" not in f]
    notes = [f"{f['format']}: not measured" for f in report["formats"] if "error" in f]
    if not ok:
        raise InputError("no format of this errors report was measured: nothing to plot")
    names = [layer["name"] for layer in report["layers"]]
    uneven = next((f["format"] for f in ok if len(f["layers"]) != len(names)), None)
    if uneven is not None:
        raise InputError(f"format {uneven!r} of this errors report has not one entry per layer of its {len(names)}")
    columns = [f"{f['format']}\n{f['bits_per_weight']:.2f} b/w\nmean {_db_text(f['mean_sqnr_db'])}" for f in ok]
    means = [_db(f["mean_sqnr_db"]) for f in ok]
    per_layer = len(names) <= max_rows if per_layer is None else per_layer
    if per_layer:
        values = [[_db(f["layers"][i]["sqnr_db"]) for f in ok] for i in range(len(names))]
        worst = [names.index(f["min_layer"]) if f.get("min_layer") in names else None for f in ok]
        return Grid(names, columns, values, worst, False, notes, means)
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(layer_kind(name), []).append(i)
    rows = [f"{kind} ({len(members)})" for kind, members in groups.items()]
    values = [[_mean([_db(f["layers"][i]["sqnr_db"]) for i in members]) for f in ok] for members in groups.values()]
    rows += [f"mean ({len(names)} layers)", "worst layer"]
    values += [[_db(f["mean_sqnr_db"]) for f in ok], [_db(f["min_sqnr_db"]) for f in ok]]
    kinds = list(groups)
    worst = [kinds.index(layer_kind(f["min_layer"])) if layer_kind(f.get("min_layer", "")) in groups else None
             for f in ok]
    return Grid(rows, columns, values, worst, True, notes, means)


def _mean(values: list[float]) -> float:
    """The mean of the finite values (a layer kept exact has no finite SQNR: null in the JSON)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


# --- a plan's format per layer ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class PlanBars:
    title: str
    layers: list[tuple[str, str, float]]  # (layer or rule pattern, label, bits per weight)
    ordered: bool  # False: a compare row's layers grouped by format (it records counts, not which layer)
    mean_bits: float | None
    budget: float | None
    kept: list[str]
    exact: bool  # bits from the layers' own stored bytes (a sensitivity table), not the format's nominal rate
    axis: str = "layer (or plan rule pattern), in plan order"


def label_bits(label: str) -> float:
    """Stored bits per weight of a format label: what `lowbit formats` gives (``formats.facts.probe``)."""
    return probe(QuantConfig.parse(label)).bits_per_weight


def plan_bars(data: dict, sensitivity: dict | None = None, row: str | None = None) -> PlanBars:
    """Per-layer formats and bits of a plan (``{"rules": ...}``), a saved model's ``lowbit.json``, a compare
    row with ``layer_formats``, or a compare report (its row ``row``, else its one mixed row). ``sensitivity``
    (a ``lowbit sensitivity --json`` table) gives each layer's exact stored bits."""
    kind = json_kind(data)
    if kind == "compare" or kind == "bench":
        data = plan_row(result_rows(data), row)
        kind = "row"
    costs = {x["name"]: x for x in (sensitivity or {}).get("layers", [])}

    def bits(layer: str, label: str) -> float:
        cost = costs.get(layer, {}).get("costs", {}).get(label)
        return 8 * cost["bytes"] / costs[layer]["numel"] if cost else label_bits(label)

    if kind == "plan":
        name = data.get("name")
        layers = [(r["pattern"], r["format"], bits(r["pattern"], r["format"])) for r in data["rules"] if "format" in r]
        kept = [r["pattern"] for r in data["rules"] if r.get("keep")]
        budget = re.fullmatch(r"budget ([0-9.]+)", name or "")
        mean = None
        if costs and all(p in costs for p, _, _ in layers):
            numel = [costs[p]["numel"] for p, _, _ in layers]
            mean = sum(b * n for (_, _, b), n in zip(layers, numel, strict=True)) / sum(numel)
        return PlanBars(f"plan {name!r}" if name else "plan", layers, True, mean,
                        float(budget[1]) if budget else None, kept, bool(costs))
    if kind == "saved":
        layers = []
        for name, layer in data["layers"].items():
            label = layer.get("label") or _saved_label(layer)
            layers.append((name, label, bits(name, label)))
        label = data["config"]["label"]
        budget = re.fullmatch(r"budget ([0-9.]+)", label)
        return PlanBars(f"{label} (saved model)", layers, True, data.get("quantize", {}).get("bits_per_weight"),
                        float(budget[1]) if budget else None, [], bool(costs), "layer (nn.Linear), in model order")
    if kind == "row":
        counts = data.get("layer_formats")
        if not counts:
            raise InputError(f"row {data.get('format')!r} holds no layer_formats (it was not scored by this lowbit, "
                             "or not scored at all)")
        layers = [(f"{label} #{i + 1}", label, label_bits(label)) for label, n in counts.items() for i in range(n)]
        budget = re.fullmatch(r"budget ([0-9.]+)", str(data["format"]))
        return PlanBars(str(data["format"]), layers, False, data.get("bits_per_weight"),
                        float(budget[1]) if budget else None, [], False)
    raise InputError(f"this is {describe(data)}; a plan plot reads a plan, a compare report or row, or lowbit.json")


def _saved_label(layer: dict) -> str:
    return f"{layer['format']}/{layer['block_size']}{'+dq' if layer.get('double_quant') else ''}"


def plan_row(rows: list[dict], wanted: str | None = None) -> dict:
    """The row named ``wanted``; else the one row quantized to more than one format (a plan)."""
    scored = [r for r in rows if r.get("layer_formats")]
    if wanted is not None:
        found = [r for r in rows if r.get("format") == wanted]
        if not found:
            raise InputError(f"no row {wanted!r}; rows: {', '.join(str(r.get('format')) for r in rows)}")
        return found[0]
    mixed = [r for r in scored if len(r["layer_formats"]) > 1]
    if len(mixed) == 1:
        return mixed[0]
    if not mixed:
        raise InputError("no row of this report mixes formats (a plan's row); name one with --row, e.g. "
                         f"--row {scored[0]['format']!r}" if scored else "no row of this report has layer_formats")
    raise InputError(f"{len(mixed)} rows mix formats: name one with --row ({', '.join(r['format'] for r in mixed)})")


# --- outliers per layer -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class OutlierBars:
    layers: list[str]
    counts: list[int]  # input features reaching the threshold
    systematic: list[int]  # of those, the systematic hidden-state features
    systematic_dims: list[int]
    threshold: float


def outlier_bars(report: dict) -> OutlierBars:
    systematic = set(report.get("systematic") or [])
    hidden = set(report.get("hidden_inputs") or [])
    layers, counts, marked = [], [], []
    for layer in report["layers"]:
        dims = [d["dim"] for d in layer["dims"]]
        layers.append(layer["name"])
        counts.append(len(dims))
        # a systematic feature is a dimension of the hidden states: it counts in the layers reading them
        reads_hidden = layer["name"] in hidden or layer.get("shares_input_with") in hidden
        marked.append(sum(d in systematic for d in dims) if reads_hidden else 0)
    return OutlierBars(layers, counts, marked, sorted(systematic), float(report["threshold"]))


def block_ticks(names: list[str]) -> tuple[list[int], list[str]]:
    """Positions where a new transformer block starts, with its number (for a per-layer axis)."""
    ticks, labels, last = [], [], object()
    for i, name in enumerate(names):
        block = next((int(p) for p in name.split(".") if p.isdigit()), None)
        if block != last and block is not None:
            ticks.append(i)
            labels.append(str(block))
        last = block
    return ticks, labels


# --- the distribution of per-token KL, and per-layer SQNR, of a compare report ---------------------------------

@dataclass(frozen=True)
class Tail:
    label: str
    kl: list[float]  # per-token KL at the quantile levels below, those > 0 only (a log axis)
    share_above: list[float]  # the share of tokens with a larger KL: 1 - level; the maximum's is 1 / tokens
    kl_mean: float | None


def kl_tails(report: dict) -> tuple[list[Tail], list[str]]:
    """Each causal row's per-token KL quantiles (``kl_quantiles``, ``lowbit.eval.causal``) as a survival curve,
    and a note for each row that has none (a failed row, an encoder's, a report written before lowbit kept them)."""
    tails, notes = [], []
    for row in result_rows(report):
        quantiles, label = row.get("kl_quantiles"), str(row.get("format", "?"))
        if "error" in row or not quantiles:
            notes.append(f"{label}: {'not scored' if 'error' in row else 'no kl_quantiles'}")
            continue
        tokens = row.get("tokens") if isinstance(row.get("tokens"), int) and row["tokens"] > 0 else None
        # the maximum is one token: a share of 1 / tokens; a level above 1 - 1/tokens only interpolates between
        # the largest few tokens, and would put the curve's end below the maximum's point
        least = 1 / tokens if tokens else 0.0
        pairs = [(kl, 1 - q if q < 1 else least) for q, kl in zip(quantiles["q"], quantiles["kl"], strict=True)
                 if kl is not None and kl > 0 and (q == 1 and tokens or q < 1 and 1 - q >= least)]
        if not pairs:
            notes.append(f"{label}: every token's KL is 0 (not on a log axis)")
            continue
        tails.append(Tail(label, [k for k, _ in pairs], [s for _, s in pairs], row.get("kl_mean")))
    return tails, notes


def compare_errors(report: dict) -> dict:
    """A compare report's per-layer weight SQNR (each row's ``layer_sqnr``) in the shape of ``lowbit errors
    --json``, which ``sqnr_grid`` and the heatmap read: the layers in model order, per row its stored bits, mean
    and worst SQNR. Rows without ``layer_sqnr`` (failed, keep rows, older reports) are left out."""
    rows = [r for r in result_rows(report) if r.get("layer_sqnr") and "error" not in r]
    if not rows:
        raise InputError("no row holds layer_sqnr (each layer's weight SQNR: a compare report of this lowbit has it)")
    names = list(dict.fromkeys(n for r in rows for n in r["layer_sqnr"]["layers"]))
    formats = []
    for r in rows:
        found = dict(zip(r["layer_sqnr"]["layers"], r["layer_sqnr"]["sqnr_db"], strict=True))
        values = [_db(found.get(n)) for n in names]
        finite = [(v, n) for v, n in zip(values, names, strict=True) if math.isfinite(v)]
        worst = min(finite) if finite else (math.nan, None)
        formats.append({"format": str(r["format"]), "bits_per_weight": r.get("bits_per_weight", math.nan),
                        "mean_sqnr_db": _mean(values), "min_sqnr_db": worst[0], "min_layer": worst[1],
                        "layers": [{"sqnr_db": v} for v in values]})
    return {"model": report.get("model"), "layers": [{"name": n} for n in names], "formats": formats}
