"""The table `lowbit compare` and `lowbit eval` print: one row per format, reference first."""

from __future__ import annotations

from rich.table import Table

_MB = 1e6


def compare_table(report: dict) -> Table:
    """``report``: the dict ``lowbit.evaluate.compare`` returns (also the JSON file)."""
    protocol, ref = report["protocol"], report["reference"]
    causal = protocol["kind"] == "causal-lm"
    if causal:
        scope = f"{protocol['windows']} windows x {protocol['window']} tokens of {protocol['text']}"
        metrics = [("PPL", "ppl", ".3f"), ("KL mean", "kl_mean", ".5f"), ("KL p99", "kl_p99", ".4f"),
                   ("same top-1", "top1", ".2%")]
    else:
        scope = f"{protocol['sentences']} paragraphs of {protocol['text']}"
        metrics = [("1-cos mean", "cos_dist_mean", ".2e"), ("1-cos max", "cos_dist_max", ".2e")]
    table = Table(title=f"{report['model']['name']}: {scope}")
    for name in ("format", "bits/weight", "weights MB", "quantize s", *(m[0] for m in metrics)):
        table.add_column(name, justify="left" if name == "format" else "right")
    perfect = {"kl_mean": 0.0, "kl_p99": 0.0, "top1": 1.0, "cos_dist_mean": 0.0, "cos_dist_max": 0.0}
    table.add_row("reference", "32", f"{ref['weight_bytes'] / _MB:.1f}", "-",
                  *(format(ref.get(key, perfect.get(key)), spec) for _, key, spec in metrics), style="dim")
    for r in report["results"]:
        table.add_row(r["format"], f"{r['bits_per_weight']:.3f}", f"{r['weight_bytes'] / _MB:.1f}",
                      f"{r['quantize_seconds']:.2f}", *(format(r[key], spec) for _, key, spec in metrics))
    return table
