"""The tables `lowbit outliers` prints: each layer's outlier input dimensions, and the hidden-state features."""

from __future__ import annotations

from rich.table import Table

SHOWN_DIMS = 4  # per layer, the dimensions with the most positions (all of them are in --json)
SHOWN_FEATURES = 20


def layer_outlier_table(report: dict) -> Table:
    """A row per layer with at least one input feature at or above the threshold."""
    table = Table(title=f"input features with |x| >= {report['threshold']:g}, per layer "
                        f"(dimension: share of positions)")
    table.add_column("layer", no_wrap=True, min_width=28)
    for header in ("width", "dims"):
        table.add_column(header, justify="right", no_wrap=True)
    table.add_column("most frequent")  # the one column that wraps: a narrow terminal cuts no layer name
    table.add_column("max |x|", justify="right", no_wrap=True)
    quiet = 0
    for layer in report["layers"]:
        dims = sorted(layer["dims"], key=lambda d: (-d["positions"], d["dim"]))
        if not dims:
            quiet += 1
            continue
        shown = ", ".join(f"{d['dim']}: {d['share']:.1%}" for d in dims[:SHOWN_DIMS])
        more = f", +{len(dims) - SHOWN_DIMS}" if len(dims) > SHOWN_DIMS else ""
        table.add_row(layer["name"], str(layer["in_features"]), str(len(dims)), shown + more,
                      f"{max(d['max_abs'] for d in dims):.1f}")
    table.caption = f"{quiet} layers with none" if quiet else None
    table.caption_justify = "left"
    return table


def feature_table(report: dict) -> Table:
    """A row per hidden-state feature dimension that reached the threshold, systematic ones first."""
    criteria = report["criteria"]
    table = Table(title=f"hidden-state features (width {report['hidden_size']}, {report['blocks']} layers): "
                        f"systematic = in >= {criteria['layer_share']:.0%} of layers and "
                        f">= {criteria['position_share']:.0%} of positions (LLM.int8() §4.1)")
    for header in ("dim", "layers", "positions", "max |x|", "systematic"):
        table.add_column(header, justify="right", no_wrap=True)
    for f in report["features"][:SHOWN_FEATURES]:
        table.add_row(str(f["dim"]), f"{f['layers']} ({f['layer_share']:.0%})", f"{f['position_share']:.2%}",
                      f"{f['max_abs']:.1f}", "yes" if f["systematic"] else "")
    rest = len(report["features"]) - SHOWN_FEATURES
    table.caption = f"+{rest} more in --json" if rest > 0 else None
    table.caption_justify = "left"
    return table
