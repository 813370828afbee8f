"""Figures of lowbit's results. Each function takes result data (what the commands write as JSON) and returns a
matplotlib ``Figure``; ``png_bytes`` and ``save_figure`` write it. matplotlib is imported only inside them (a
command that draws nothing never loads it), and never through pyplot: each figure has its own Agg canvas and
nothing global holds it, so a figure is freed once unreferenced. Data extraction: ``lowbit.report.plot_data``.
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path
from statistics import NormalDist

from . import plot_data as pd

SUFFIXES = (".png", ".svg", ".pdf")
MARKERS = {"bitsandbytes": "s", "hqq": "D", "gguf-py": "^", "llama.cpp": "P", "peer": "X"}
DPI = 110


def check_suffix(path: str | os.PathLike) -> str:
    """The output format of ``path`` (png, svg or pdf, from its suffix), or a ValueError."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: a figure is written as {', '.join(SUFFIXES)} (from the file name's suffix)")
    return suffix[1:]


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def save_figure(fig, path: str | os.PathLike) -> Path:
    """``fig`` written to ``path`` atomically, in the format its suffix names; the figure is cleared after."""
    from ..io.atomic import atomic_file

    kind = check_suffix(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=kind, dpi=DPI)
    fig.clear()
    return Path(path)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _note(text: str):
    """An invisible legend handle: a line of explanation in the legend."""
    from matplotlib.patches import Patch

    return Patch(fill=False, edgecolor="none", label=text)


def _tick(color: str, label: str):
    """A legend handle: a level tick of that colour (a scatter's own handle draws it off the line's centre)."""
    from matplotlib.lines import Line2D

    return Line2D([], [], marker="|", ls="none", markersize=9, markeredgewidth=2, color=color, label=label)


def _layer_axis(ax, names: list[str], label: str) -> None:
    """An x axis of one bar per layer: each name when they fit, else a tick per transformer block."""
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), [name.removeprefix("model.") for name in names], rotation=90, fontsize=7)
    else:
        ax.set_xticks(*pd.block_ticks(names), fontsize=7)
        label += " (ticks: transformer block number)"
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel(label)


def _model(report) -> str:
    model = report.get("model") if isinstance(report, dict) else None
    return (model or {}).get("name") or (model or {}).get("source") or "model"


# --- 1. KL against bits -----------------------------------------------------------------------------------------

def kl_vs_bits(report, peers=None):
    """Mean KL (log scale) against stored bits per weight, a point per row of a compare report (or a bench
    report's lowbit rows), each labelled; the Pareto front as a step line; ``peers`` (a bench report, or rows)
    with their own markers. An encoder's rows plot their mean cosine distance instead."""
    d = pd.kl_points(report, peers)
    pts, peer_pts, notes = d.points, d.peers, d.notes
    fig = _figure(11, 6.5)
    ax = fig.add_subplot()
    ax.set_yscale("log")
    if pts:
        ax.scatter([p.bits for p in pts], [p.value for p in pts], color="C0", zorder=3, label="lowbit formats")
    front = pd.pareto_front(pts)
    if len(front) > 1:
        ax.step([p.bits for p in front], [p.value for p in front], where="post", color="C3", lw=1.2, zorder=2)
    if front:
        ax.scatter([p.bits for p in front], [p.value for p in front], s=110, facecolors="none", edgecolors="C3",
                   lw=1.4, zorder=4, label="Pareto front: the lowest value for at most those bits")
    for i, group in enumerate(dict.fromkeys(p.group for p in peer_pts)):
        mine = [p for p in peer_pts if p.group == group]
        ax.scatter([p.bits for p in mine], [p.value for p in mine], marker=MARKERS.get(group, "X"), s=55,
                   color=f"C{i + 4}", zorder=3, label="peer" if group == "peer" else f"{group} (peer"
                   + (", measured separately)" if group == "llama.cpp" else ")"))
    for label, value in d.keep:
        ax.axhline(value, color="grey", ls=":", lw=1, label=f"{label}: only the unquantized tensors rounded "
                                                            f"({value:.2g})")
    xs, ys = [p.bits for p in pts + peer_pts], [p.value for p in pts + peer_pts] + [v for _, v in d.keep]
    span = max(max(xs) - min(xs), 1.0)
    ax.set_xlim(min(xs) - 0.06 * span, max(xs) + 0.22 * span)
    ax.set_ylim(min(ys) / 1.8, max(ys) * 1.8)
    ax.set_xlabel("bits per weight (stored)")
    ax.set_ylabel(d.metric[1])
    ax.set_title(f"{_model(report)}: {d.metric[2]} against stored bits per weight")
    ax.grid(True, which="major", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [_note(f"not shown: {note}") for note in notes]
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False,
               scatteryoffsets=[0.5])
    on_front = {id(p) for p in front}
    _label_points(ax, [(p, "C3" if id(p) in on_front else "C0") for p in pts] +
                  [(p, "dimgrey") for p in peer_pts])
    return fig


def _label_points(ax, items) -> None:
    """Each point's label beside it. Points of about the same bits form a column; its labels stack beside it in
    the points' order, each at its point's height where there is room, else moved (with a leader line): a label
    never covers another, and the lines never cross. A column's labels go right of it, or left where that covers
    fewer points."""
    fig = ax.figure
    fig.canvas.draw()  # the layout settles: display coordinates are final from here
    renderer = fig.canvas.get_renderer()
    box = ax.get_window_extent(renderer)
    at = [ax.transData.transform((p.bits, p.value)) for p, _ in items]
    sizes = []
    for p, color in items:
        ann = _annotation(ax, p, 0, 0, color)
        bb = ann.get_window_extent(renderer)
        sizes.append((bb.width, bb.height))
        ann.remove()
    step = max(h for _, h in sizes) + 1
    columns: list[list[int]] = []
    for i in sorted(range(len(items)), key=lambda i: at[i][0]):
        if columns and at[i][0] - at[columns[-1][-1]][0] < 12:
            columns[-1].append(i)
        else:
            columns.append([i])
    placed = []  # label boxes so far
    for column in columns:
        ys = pd.spread(sorted(at[i][1] for i in column), step, box.y0 + step / 2, box.y1 - step / 2)
        order = sorted(column, key=lambda i: at[i][1])
        best = None
        for side in (1, -1):
            edge = max(at[i][0] for i in column) + 10 if side > 0 else min(at[i][0] for i in column) - 10
            boxes = [_bbox(edge if side > 0 else edge - sizes[i][0], y - step / 2,
                           edge + sizes[i][0] if side > 0 else edge, y + step / 2)
                     for i, y in zip(order, ys, strict=True)]
            covered = sum(b.overlaps(_bbox(x - 4, y - 4, x + 4, y + 4)) for b in boxes for x, y in at)
            covered += sum(b.overlaps(o) for b in boxes for o in placed)
            covered += sum(b.x0 < box.x0 or b.x1 > box.x1 for b in boxes)
            if best is None or covered < best[0]:
                best = (covered, side, edge, boxes)
        _, side, edge, boxes = best
        placed += boxes
        for i, y in zip(order, ys, strict=True):
            p, color = items[i]
            dx, dy = (edge - at[i][0]) * 72 / fig.dpi, (y - at[i][1]) * 72 / fig.dpi
            _annotation(ax, p, dx, dy, color, ha="left" if side > 0 else "right", leader=abs(dy) > 1.5)


def _annotation(ax, p, dx, dy, color, ha="left", leader=False):
    arrow = dict(arrowstyle="-", color=color, lw=0.6, shrinkA=0, shrinkB=3,  # from the text's near side
                 relpos=(0, 0.5) if ha == "left" else (1, 0.5)) if leader else None
    return ax.annotate(p.label, (p.bits, p.value), xytext=(dx, dy), textcoords="offset points", fontsize=7.5,
                       ha=ha, va="center", color=color, arrowprops=arrow,
                       bbox=dict(boxstyle="square,pad=0.05", fc="white", ec="none", alpha=0.75))


def _bbox(x0, y0, x1, y1):
    from matplotlib.transforms import Bbox

    return Bbox([[x0, y0], [x1, y1]])


# --- 2. SQNR heatmap --------------------------------------------------------------------------------------------

def sqnr_heatmap(errors_report, per_layer: bool | None = None):
    """Layers x formats SQNR (dB) of a ``lowbit errors --json`` report; many layers: one row per layer kind
    (``plot_data.sqnr_grid``). The numbers are each cell's SQNR; its colour is that against the format's mean
    over all layers (formats of different bits differ by far more than layers do, and would hide them). Each
    format's worst layer (or its kind) is outlined."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.patches import Patch, Rectangle

    grid = pd.sqnr_grid(errors_report, per_layer)
    values = np.array(grid.values, dtype=float)
    relative = values - np.array(grid.means)[None, :]
    n, m = values.shape
    reach = max(float(np.nanmax(np.abs(relative))) if np.isfinite(relative).any() else 1.0, 0.5)
    width = max(7.0, 1.0 * m + 0.075 * max(len(r) for r in grid.rows) + 2.5)
    height = max(4.5, (0.3 if n <= 60 else 0.13) * n + 2.6)
    fig = _figure(width, height)
    ax = fig.add_subplot()
    cmap = colormaps["RdBu"].with_extremes(bad="lightgrey")
    im = ax.imshow(np.ma.masked_invalid(relative), aspect="auto", cmap=cmap, vmin=-reach, vmax=reach,
                   interpolation="nearest")
    fig.colorbar(im, ax=ax, label="SQNR minus the format's mean (dB)", shrink=min(1.0, 10 / height),
                 anchor=(0, 1))
    if n <= 60 and m <= 16:  # the numbers fit in the cells
        for i in range(n):
            for j in range(m):
                v, strong = values[i, j], abs(relative[i, j]) > 0.7 * reach
                ax.text(j, i, "n/a" if math.isnan(v) else f"{v:.1f}", ha="center", va="center", fontsize=7.5,
                        color="white" if strong else "black")
    for j, i in enumerate(grid.worst):
        if i is not None:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="black", lw=2))
    if grid.grouped:
        ax.axhline(n - 2.5, color="black", lw=1.5)
    ax.set_xticks(range(m), grid.formats, fontsize=8)
    ax.set_yticks(range(n), grid.rows, fontsize=8 if n <= 60 else 6)
    ax.set_xlabel("format (stored bits per weight; mean SQNR over all layers)")
    ax.set_ylabel("layer kind (mean of its layers; their number in parentheses)" if grid.grouped
                  else "layer (nn.Linear weight)")
    ax.set_title(f"{_model(errors_report)}: weight SQNR (dB) per layer{' kind' * grid.grouped} and format")
    handles = [Patch(fill=False, edgecolor="black", lw=2,
                     label="each format's worst layer" + (" (its kind)" if grid.grouped else ""))]
    handles.append(_note("colour: red below, blue above the format's mean over all layers"))
    if n <= 60 and m <= 16:
        handles.append(_note("numbers: SQNR (dB, higher is better)"))
    if np.isnan(values).any():
        handles.append(Patch(color="lightgrey", label="n/a: exact or not finite"))
    handles += [_note(note) for note in grid.notes]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return fig


# --- 3. a plan's layers -----------------------------------------------------------------------------------------

def plan_layers(plan_or_result, sensitivity=None, row: str | None = None):
    """A bar per layer of bits per weight coloured by format: a plan, a saved model's lowbit.json, or a compare
    row (or report: its plan row, or ``row``), whose layers are grouped by format (it records only counts)."""
    from matplotlib.patches import Patch

    bars = pd.plan_bars(plan_or_result, sensitivity, row)
    if not bars.layers:
        raise ValueError("the plan quantizes no layer: nothing to plot")
    labels = list(dict.fromkeys(label for _, label, _ in bars.layers))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    n = len(bars.layers)
    fig = _figure(min(16.0, max(8.0, 0.2 * n + 3)) if n <= 40 else 13.0, 6.0)
    ax = fig.add_subplot()
    heights = [b for _, _, b in bars.layers]
    ax.bar(range(n), heights, width=0.8, color=[colors[lab] for _, lab, _ in bars.layers],
           linewidth=0)
    handles = [Patch(color=colors[lab], label=f"{lab} ({sum(lab == x for _, x, _ in bars.layers)} layers)")
               for lab in labels]
    if bars.mean_bits is not None:
        handles.append(ax.axhline(bars.mean_bits, color="black", ls="--", lw=1,
                                  label=f"all these layers together: {bars.mean_bits:.3f} bits per weight"))
    if bars.budget is not None:
        handles.append(ax.axhline(bars.budget, color="red", ls=":", lw=1.2,
                                  label=f"budget: {bars.budget:g} bits per weight"))
    if bars.kept:
        handles.append(_note(f"kept in full precision: {', '.join(bars.kept[:4])}"))
    if bars.ordered:
        _layer_axis(ax, [name for name, _, _ in bars.layers], bars.axis)
    else:
        ax.set_xticks([])
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xlabel("layers, grouped by format (a compare row records how many layers took each format, "
                      "not which)")
    ax.set_ylim(0, max(heights + [bars.budget or 0, bars.mean_bits or 0]) * 1.12)
    ax.set_ylabel("bits per weight (stored" + (", this layer's bytes)" if bars.exact else
                                                 "; the format's rate on a 64×4096 tensor)"))
    ax.set_title(f"{bars.title}: format and bits per weight of each layer")
    fig.legend(handles=handles, loc="outside right upper", fontsize=8)
    return fig


# --- 4. outliers ------------------------------------------------------------------------------------------------

def outlier_counts(outliers_report):
    """Per layer, the input features reaching the threshold (bars coloured by layer kind, symlog scale: counts
    run from 0 to thousands), the systematic hidden-state features (LLM.int8() §4.1) among them in black."""
    from matplotlib.patches import Patch

    data = pd.outlier_bars(outliers_report)
    n = len(data.layers)
    fig = _figure(13.0 if n > 40 else max(8.0, 0.25 * n + 3), 5.5)
    ax = fig.add_subplot()
    thr, width = f"{data.threshold:g}", 1.0 if n > 60 else 0.85
    kinds = [pd.layer_kind(name).removeprefix("model.layers.*.") for name in data.layers]
    colors = {kind: f"C{i % 10}" for i, kind in enumerate(dict.fromkeys(kinds))}
    ax.bar(range(n), data.counts, width=width, color=[colors[k] for k in kinds], linewidth=0)
    ax.bar(range(n), data.systematic, width=width, color="black", linewidth=0)
    handles = [Patch(color=c, label=kind) for kind, c in colors.items()]
    crit = outliers_report.get("criteria") or {}
    dims = ", ".join(map(str, data.systematic_dims[:12])) + (", ..." if len(data.systematic_dims) > 12 else "")
    handles.append(Patch(color="black", label=f"of which systematic (≥ {crit.get('layer_share', 0.25):.0%} of "
                                              f"layers, ≥ {crit.get('position_share', 0.06):.0%} of positions): "
                                              + (f"dim{'s' * (len(data.systematic_dims) > 1)} {dims}" if dims
                                                 else "none")))
    _layer_axis(ax, data.layers, "layer (nn.Linear), in model order")
    ax.set_yscale("symlog", linthresh=1, linscale=0.5)
    ax.set_ylim(0, max(data.counts + [1]) * 4)  # room for the legend above the bars
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_ylabel(f"input features with |x| ≥ {thr} in some position (count, symlog scale)")
    ax.set_title(f"{_model(outliers_report)}: outlier input features per layer (LLM.int8(), threshold {thr})")
    ax.legend(handles=handles, loc="upper left", fontsize=8, ncols=min(4, len(handles)))
    return fig


# --- 5. a layer's weights and the levels of one block -----------------------------------------------------------

def layer_levels(data: dict):
    """``level_data.layer_levels_data``'s histogram of a layer's weights, under it a row of level ticks per format:
    the levels of the block with the median absmax, as the format decodes that block."""
    formats = data["formats"]
    fig = _figure(11, 5.0 + 0.6 * len(formats))
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=[3, max(1.0, 0.45 * len(formats))])
    outside = data.get("outside", 0.0)
    top.stairs(data["density"], data["edges"], fill=True, color="0.8",
               label=f"the layer's weights ({outside:.2%} beyond the axis)" if outside else "the layer's weights")
    handles, _ = top.get_legend_handles_labels()
    for i, f in enumerate(formats):
        bottom.scatter(f["levels"], [i] * len(f["levels"]), marker="|", s=260, linewidths=1.8, color=f"C{i}")
        handles.append(_tick(f"C{i}", f"{f['label']}: {f['bits_per_weight']:.3g} bits/weight, {len(f['levels'])} "
                                      f"levels (block {f['block']}, absmax {f['absmax']:.3g})"))
    top.set_ylabel("density (per unit weight)")
    fig.legend(handles=handles, loc="outside lower center", ncols=2, fontsize=8, frameon=False)
    bottom.set_yticks(range(len(formats)), [f["label"] for f in formats])
    bottom.set_ylim(len(formats) - 0.5, -0.5)
    bottom.set_ylabel("format")
    bottom.set_xlabel("weight value")
    bottom.set_xlim(*data["range"])
    bottom.grid(True, axis="x", alpha=0.3)
    shape = "×".join(map(str, data.get("shape", [])))
    name = data.get("layer") or "weight"
    top.set_title(f"{name} ({shape}): weight histogram\nand the levels of one block per format, "
                  "each the format's block of median absmax")
    return fig


# --- 6. a format's levels ---------------------------------------------------------------------------------------

def format_levels(label_levels, gaussian: bool = False):
    """Levels before scaling of one or more formats (``{label: levels}``, e.g. ``formats_cmd.levels(spec)``) on
    the number line; ``gaussian``: with the N(0, 1) density the NF levels are quantiles of, scaled as they are
    (``lowbit.formats.codebooks``: the largest level is the quantile at NF_DELTA)."""
    from ..formats.codebooks import NF_DELTA

    items = list(label_levels.items()) if isinstance(label_levels, dict) else list(label_levels)
    items = [(label, sorted({v for v in levels if math.isfinite(v)})) for label, levels in items]  # +0 = -0
    if not items or not all(levels for _, levels in items):
        raise ValueError("no levels to plot (a learned codebook's levels belong to each tensor: "
                         "`lowbit plot levels --formats qq4` shows a layer's)")
    fig = _figure(10, 4.5 if gaussian else 2.2 + 0.5 * len(items))
    ax = fig.add_subplot()
    reach = max(abs(v) for _, levels in items for v in levels)
    if gaussian:
        c = NormalDist().inv_cdf(NF_DELTA)
        xs = [reach * (-1.15 + 2.3 * i / 400) for i in range(401)]
        ax.plot(xs, [c / reach * NormalDist().pdf(c * x / reach) for x in xs], color="black", lw=1.2,
                label=f"N(0, 1) density, scaled so its {NF_DELTA:.2%} quantile is the largest level")
        for i, (label, levels) in enumerate(items):
            ys = [c / reach * NormalDist().pdf(c * v / reach) for v in levels]
            ax.vlines(levels, 0, ys, color=f"C{i}", lw=1)
            ax.scatter(levels, [0] * len(levels), color=f"C{i}", zorder=3, s=22, clip_on=False,
                       label=f"{label}: {len(levels)} levels")
        ax.set_ylim(0, 1.3 * c / reach * NormalDist().pdf(0))  # room for the legend above the curve
        ax.set_ylabel("density of N(0, 1), scaled (per unit level)")
    else:
        ticks = []
        for i, (label, levels) in enumerate(items):
            ax.scatter(levels, [i] * len(levels), marker="|", s=300, linewidths=2, color=f"C{i}")
            ticks.append(_tick(f"C{i}", f"{label}: {len(levels)} levels"))
        ax.set_yticks(range(len(items)), [label for label, _ in items])
        ax.set_ylim(len(items) - 0.5, -0.5)
        ax.set_ylabel("format")
    lo, hi = min(v for _, levels in items for v in levels), max(v for _, levels in items for v in levels)
    pad = 0.08 * max(hi - lo, 1e-9)
    ax.set_xlim(-1.15 * reach if gaussian else lo - pad, 1.15 * reach if gaussian else hi + pad)
    ax.grid(True, axis="x", alpha=0.3)
    ax.set_xlabel("level (in units of the block scale: w = level × scale, plus the block's offset where one "
                  "is stored)")
    labels = ", ".join(label for label, _ in items)
    ax.set_title(f"{labels}: element levels" + (" and the normal density they are quantiles of" if gaussian
                                                 else ""))
    if gaussian:
        ax.legend(loc="upper right", fontsize=8)
    else:
        fig.legend(handles=ticks, loc="outside lower center", ncols=min(4, len(items)), fontsize=8, frameon=False)
    return fig
