"""Per-layer figures: weight SQNR per layer and format (`lowbit errors`), a mixed plan's format and bits per
layer, and outlier input features per layer (`lowbit outliers`). Each takes result data, never a model;
matplotlib is imported only inside them. Data extraction: ``lowbit.report.plot_data``.
"""

from __future__ import annotations

import math

from ..errors import InputError
from . import plot_data as pd
from .figure import layer_axis, legend_note, model_name, new_figure

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
    fig = new_figure(width, height)
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
    ax.set_title(f"{model_name(errors_report)}: weight SQNR (dB) per layer{' kind' * grid.grouped} and format")
    handles = [Patch(fill=False, edgecolor="black", lw=2,
                     label="each format's worst layer" + (" (its kind)" if grid.grouped else ""))]
    handles.append(legend_note("colour: red below, blue above the format's mean over all layers"))
    if n <= 60 and m <= 16:
        handles.append(legend_note("numbers: SQNR (dB, higher is better)"))
    if np.isnan(values).any():
        handles.append(Patch(color="lightgrey", label="n/a: exact or not finite"))
    handles += [legend_note(note) for note in grid.notes]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    return fig


# --- 3. a plan's layers -----------------------------------------------------------------------------------------

def plan_layers(plan_or_result, sensitivity=None, row: str | None = None):
    """A bar per layer of bits per weight coloured by format: a plan, a saved model's lowbit.json, or a compare
    row (or report: its plan row, or ``row``), whose layers are grouped by format (it records only counts)."""
    from matplotlib.patches import Patch

    bars = pd.plan_bars(plan_or_result, sensitivity, row)
    if not bars.layers:
        raise InputError("the plan quantizes no layer: nothing to plot")
    labels = list(dict.fromkeys(label for _, label, _ in bars.layers))
    colors = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    n = len(bars.layers)
    fig = new_figure(min(16.0, max(9.0, 0.2 * n + 3)) if n <= 40 else 13.0, 6.5)
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
        handles.append(legend_note(f"kept in full precision: {', '.join(bars.kept[:4])}"))
    if bars.ordered:
        layer_axis(ax, [name for name, _, _ in bars.layers], bars.axis)
    else:
        ax.set_xticks([])
        ax.set_xlim(-0.6, n - 0.4)
        ax.set_xlabel("layers, grouped by format (a compare row records how many layers took each format, "
                      "not which)")
    ax.set_ylim(0, max(heights + [bars.budget or 0, bars.mean_bits or 0]) * 1.12)
    # two lines: one line of this label is taller than the axes of a short figure, and was cut at the top
    ax.set_ylabel("bits per weight\n(stored" + (", this layer's bytes)" if bars.exact else
                                                "; the format's rate on a 64×4096 tensor)"))
    ax.set_title(f"{bars.title}: format and bits per weight of each layer", wrap=True)
    # below the axes, not beside them: beside, a long legend took the width the axes and their title need (the
    # title of a 14-layer plan ran under it and off the figure's left edge)
    fig.legend(handles=handles, loc="outside lower center", ncols=min(3, len(handles)), fontsize=8, frameon=False)
    return fig


# --- 4. outliers ------------------------------------------------------------------------------------------------

def outlier_counts(outliers_report):
    """Per layer, the input features reaching the threshold (bars coloured by layer kind, symlog scale: counts
    run from 0 to thousands), the systematic hidden-state features (LLM.int8() §4.1) among them in black."""
    from matplotlib.patches import Patch

    data = pd.outlier_bars(outliers_report)
    n = len(data.layers)
    fig = new_figure(13.0 if n > 40 else max(8.0, 0.25 * n + 3), 5.5)
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
    layer_axis(ax, data.layers, "layer (nn.Linear), in model order")
    ax.set_yscale("symlog", linthresh=1, linscale=0.5)
    ax.set_ylim(0, max(data.counts + [1]) * 4)  # room for the legend above the bars
    ax.grid(True, axis="y", alpha=0.3)
    ax.set_ylabel(f"input features with |x| ≥ {thr} in some position (count, symlog scale)")
    ax.set_title(f"{model_name(outliers_report)}: outlier input features per layer (LLM.int8(), threshold {thr})")
    ax.legend(handles=handles, loc="upper left", fontsize=8, ncols=min(4, len(handles)))
    return fig
