"""Figures of lowbit's results: KL against bits, the distribution of per-token KL, a layer's levels, a format's
levels. Each function takes result data (what the commands write as JSON) and returns a matplotlib ``Figure``;
``lowbit.report.figure`` writes it (``png_bytes``, ``save_figure``). matplotlib is imported only inside them (a
command that draws nothing never loads it). The per-layer figures (SQNR heatmap, plan, outliers) are
``lowbit.report.layer_plots``'. Data extraction: ``lowbit.report.plot_data``.
"""

from __future__ import annotations

import math
from statistics import NormalDist

from ..errors import InputError
from ..formats.levels import NF_DELTA
from . import plot_data as pd
from .figure import legend_note, model_name, new_figure

MARKERS = {"bitsandbytes": "s", "hqq": "D", "gguf-py": "^", "llama.cpp": "P", "peer": "X"}


def _tick(color: str, label: str):
    """A legend handle: a level tick of that colour (a scatter's own handle draws it off the line's centre)."""
    from matplotlib.lines import Line2D

    return Line2D([], [], marker="|", ls="none", markersize=9, markeredgewidth=2, color=color, label=label)


# --- 1. KL against bits -----------------------------------------------------------------------------------------

def kl_vs_bits(report, peers=None):
    """Mean KL (log scale) against stored bits per weight, a point per row of a compare report (or a bench
    report's lowbit rows), each labelled; the Pareto front as a step line; ``peers`` (a bench report, or rows)
    with their own markers. An encoder's rows plot their mean cosine distance instead."""
    d = pd.kl_points(report, peers)
    pts, peer_pts, notes = d.points, d.peers, d.notes
    fig = new_figure(11, 6.5)
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
    ax.set_title(f"{model_name(report)}: {d.metric[2]} against stored bits per weight")
    ax.grid(True, which="major", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [legend_note(f"not shown: {note}") for note in notes]
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


# --- 1b. the distribution of per-token KL -----------------------------------------------------------------------

def kl_tail(report):
    """Per row of a compare report, the share of scored tokens whose KL exceeds x, against x (log-log, a survival
    curve from the row's ``kl_quantiles``): a mean can hide a few tokens the format gets badly wrong, which the
    curve's right end shows (llama.cpp reports the 99th percentile and the maximum for the same reason)."""
    tails, notes = pd.kl_tails(report)
    if not tails:
        raise InputError("no row holds per-token KL quantiles (kl_quantiles: a compare report of this lowbit has them)")
    fig = new_figure(11, 6.5)
    ax = fig.add_subplot()
    ax.set_xscale("log")
    ax.set_yscale("log")
    styles = ("-", "--", "-.", ":")
    order = sorted(tails, key=lambda t: t.kl_mean if isinstance(t.kl_mean, (int, float)) else math.inf)
    for i, t in enumerate(order):
        mean = f", mean {t.kl_mean:.3g}" if isinstance(t.kl_mean, (int, float)) else ""
        ax.plot(t.kl, t.share_above, color=f"C{i % 10}", ls=styles[i // 10 % 4], marker=".", markersize=5, lw=1.3,
                label=f"{t.label} (max {t.kl[-1]:.3g}{mean})")
    for share, name in ((0.01, "p99"), (0.001, "p99.9")):
        ax.axhline(share, color="grey", ls=":", lw=0.8)
        ax.annotate(name, (0, share), xycoords=("axes fraction", "data"), xytext=(3, 2), textcoords="offset points",
                    fontsize=7.5, color="grey")
    ax.set_xlabel("per-token KL divergence to the original, x (nats, log scale)")
    ax.set_ylabel("share of scored tokens with KL above x (log scale)")
    ax.set_title(f"{model_name(report)}: distribution of per-token KL divergence (the tail is on the right)")
    ax.grid(True, which="major", alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    handles += [legend_note("each curve's last point: its one worst token (1 / tokens scored)")]
    handles += [legend_note(f"not shown: {note}") for note in notes]
    fig.legend(handles=handles, loc="outside lower center", ncols=3, fontsize=8, frameon=False)
    return fig


# --- 5. a layer's weights and the levels of one block -----------------------------------------------------------

def layer_levels(data: dict):
    """``lowbit.workflows.levels.layer_levels_data``'s histogram of a layer's weights, under it a row of level
    ticks per format: the levels of the block with the median absmax, as the format decodes that block."""
    formats = data["formats"]
    fig = new_figure(11, 5.0 + 0.6 * len(formats))
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
    items = list(label_levels.items()) if isinstance(label_levels, dict) else list(label_levels)
    items = [(label, sorted({v for v in levels if math.isfinite(v)})) for label, levels in items]  # +0 = -0
    if not items or not all(levels for _, levels in items):
        raise InputError("no levels to plot (a learned codebook's levels belong to each tensor: "
                         "`lowbit plot levels --formats qq4` shows a layer's)")
    fig = new_figure(10, 4.5 if gaussian else 2.2 + 0.5 * len(items))
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
