"""The table `lowbit compare` prints: one row per format, reference first."""

from __future__ import annotations

from rich.table import Table

_MB = 1e6


def compare_table(reference: dict, rows: list[dict], title: str) -> Table:
    """reference: {"ppl", "weight_bytes"}; rows: the per-format dicts of the JSON report."""
    table = Table(title=title)
    columns = [("format", "left"), ("bits/weight", "right"), ("weights MB", "right"), ("quantize s", "right"),
               ("PPL", "right"), ("KL mean", "right"), ("KL p99", "right"), ("same top-1", "right")]
    for name, justify in columns:
        table.add_column(name, justify=justify)
    table.add_row("reference (fp32)", "32", f"{reference['weight_bytes'] / _MB:.1f}", "-", f"{reference['ppl']:.3f}",
                  "0", "0", "100.00%", style="dim")
    for r in rows:
        table.add_row(
            r["label"], f"{r['bits_per_weight']:.3f}", f"{r['weight_bytes'] / _MB:.1f}", f"{r['quantize_seconds']:.2f}",
            f"{r['ppl']:.3f}", f"{r['kl_mean']:.5f}", f"{r['kl_p99']:.4f}", f"{100 * r['top1']:.2f}%",
        )
    return table
