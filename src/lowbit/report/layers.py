"""Per-layer tables: a sensitivity table (`lowbit sensitivity`) and a budget plan (`lowbit quantize --budget`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from ..planning.budget import BudgetPlan
    from ..planning.sensitivity import Sensitivity


def sensitivity_table(s: Sensitivity) -> Table:
    """A row per layer, a column per candidate: KL of that layer alone in that format (``~``: predicted)."""
    title = (f"KL when one layer alone is quantized ({s.windows} calibration windows; "
             f"~ predicted from output error, anchor {s.anchor})")
    table = Table(title=title)
    table.add_column("layer", no_wrap=True)
    for label in s.candidates:
        bits = [s.bits(n, label) for n in s.numel if label in s.costs[n]]
        table.add_column(f"{label}\n{sum(bits) / len(bits):.3f} b/w" if bits else label, justify="right")
    for name in s.numel:
        cells = []
        for label in s.candidates:
            cost = s.costs[name].get(label)
            cells.append("-" if cost is None else f"{'' if cost.measured else '~'}{cost.kl:.2e}")
        table.add_row(name, *cells)
    table.caption = "- : the layer's shape cannot hold the format"
    table.caption_justify = "left"
    return table


def budget_table(chosen: BudgetPlan) -> Table:
    table = Table(title=f"plan for {chosen.budget:g} bits per weight: {chosen.bits_per_weight:.4f} stored, "
                        f"predicted KL {chosen.predicted_kl:.5f} (sum over layers)")
    for header in ("layer", "format", "bits/weight", "predicted KL"):
        table.add_column(header, justify="left" if header in ("layer", "format") else "right", no_wrap=True)
    for c in chosen.choices:
        table.add_row(c.layer, c.label, f"{c.bits:.3f}", f"{'' if c.measured else '~'}{c.kl:.2e}")
    return table
