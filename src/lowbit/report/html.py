"""The HTML report of a compare run: one self-contained file, readable offline and without JavaScript.

Styles are in a <style> element, every figure is a PNG inside the page (a ``data:`` URI), and
nothing is fetched: the file can be mailed, archived or opened from a USB stick. It holds the
results table (the same columns as the terminal's, ``report.table.table_data``), the figures
(``report.plots``), the protocol, the model with its sha256, the library versions and the date
the results were measured.
"""

from __future__ import annotations

import base64
import html
import json
import os
from datetime import datetime, timezone
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..files.atomic import atomic_file
from .figure import png_bytes
from .layer_plots import plan_layers, sqnr_heatmap
from .plot_data import Point, compare_errors, is_keep_row, pareto_front
from .table import cell, layer_notes, scope, table_data

_STYLE = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: #1d2329; background: #fff;
       max-width: 1180px; margin: 2em auto; padding: 0 1.2em; }
h1 { font-size: 1.5em; margin-bottom: .2em; }
h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
.sub { color: #56606b; margin-top: 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; margin: .6em 0; }
th, td { padding: .25em .7em; border-bottom: 1px solid #e4e7ea; }
th { background: #f3f5f7; text-align: right; } th:first-child, td:first-child { text-align: left; }
td { text-align: right; } tr.reference td { color: #6b7580; } tr.best td { background: #eef7ee; }
td.error { text-align: left; color: #a33; }
dl { display: grid; grid-template-columns: max-content auto; gap: .2em 1.2em; } dt { color: #56606b; }
dd { margin: 0; font-family: ui-monospace, monospace; word-break: break-all; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; height: auto; border: 1px solid #e4e7ea; }
figcaption { color: #56606b; font-size: .92em; } ul.notes { color: #56606b; }
"""


def render(report: dict, figures: list[tuple[str, str, bytes | None]] | None = None, *,
           created: str | None = None) -> str:
    """The page for ``report`` (``lowbit.evaluate.compare``'s dict, or its JSON file loaded).

    ``figures``: (title, caption, PNG bytes) each, shown in order; bytes None: the caption is a note instead.
    ``created``: when the page was written (default now, UTC); the date the results were measured is the
    report's own ``date``."""
    model, protocol = report["model"], report["protocol"]
    source = model.get("source") or ""
    title = f"lowbit compare: {model['name']}" + (f" ({source})" if source and source != model["name"] else "")
    parts = [f"<h1>{_e(title)}</h1>", f"<p class=sub>{_e(scope(protocol))}</p>",
             "<h2>Results</h2>", _results_table(report)]
    notes = layer_notes(report)  # a row that could not be scored says why in the table itself
    if notes:
        parts.append("<ul class=notes>" + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>")
    for fig_title, caption, png in figures or ():
        if png is None:  # no data for it in this report: say so where it would be
            parts.append(f"<p class=sub>{_e(fig_title)}: {_e(caption)}</p>")
            continue
        data = base64.b64encode(png).decode("ascii")
        parts.append(f"<figure><img alt=\"{_e(fig_title)}\" src=\"data:image/png;base64,{data}\">"
                     f"<figcaption>{_e(caption)}</figcaption></figure>")
    parts += ["<h2>Protocol</h2>", _protocol(report), "<h2>Model and software</h2>", _provenance(report, created)]
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang=en>\n<head>\n<meta charset=utf-8>\n"
            f"<meta name=viewport content=\"width=device-width, initial-scale=1\">\n<title>{_e(title)}</title>\n"
            f"<style>{_STYLE}</style>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _results_table(report: dict) -> str:
    columns, rows = table_data(report)
    key = "kl_mean" if report["protocol"]["kind"] == "causal-lm" else "cos_dist_mean"
    # as in the figure: a "keep <dtype>" row quantizes no layer, so it is no point on the front; a score
    # of 0, which the log-axis figure leaves out, is on it here
    front = {p.label for p in pareto_front([Point(r["format"], r["bits_per_weight"], r[key]) for r in rows[1:]
                                            if isinstance(r.get(key), (int, float)) and "bits_per_weight" in r
                                            and not is_keep_row(r)])}
    head = "".join(f"<th>{_e(h)}</th>" for h, _, _ in columns)
    lines = [f"<table><thead><tr>{head}</tr></thead><tbody>"]
    for i, row in enumerate(rows):
        cls = " class=reference" if i == 0 else " class=best" if row["format"] in front else ""
        if "error" in row:
            cells = f"<td>{_e(row['format'])}</td><td class=error colspan={len(columns) - 1}>{_e(row['error'])}</td>"
        else:
            cells = "".join(f"<td>{_e(cell(row.get(k), spec))}</td>" for _, k, spec in columns)
        lines.append(f"<tr{cls}>{cells}</tr>")
    lines.append("</tbody></table>")
    what = "mean KL" if key == "kl_mean" else "mean 1 - cos"
    if front:
        lines.append(f"<p class=sub>Shaded: the Pareto front, the rows no other row beats on both bits per weight and "
                     f"{what}. The first row is the original model.</p>")
    return "\n".join(lines)


def _protocol(report: dict) -> str:
    p = report["protocol"]
    items = {"scored": scope(p)}
    if p["kind"] == "causal-lm":
        items["metrics"] = ("per scored token: KL divergence from the original model's next-token distribution to "
                            "the quantized model's (nats), whether the top-1 token is the same; perplexity of the "
                            "text; KL mean, median, p99 and max over all scored tokens")
    else:
        items["metrics"] = "per paragraph: 1 - cosine similarity of the quantized model's embedding to the original's"
    if "calibration" in report:
        c = report["calibration"]
        items["calibration"] = f"{c['windows']} windows after the scored ones ({c['seconds']:.1f} s)"
    if "keep_dtype" in report:
        items["unquantized tensors"] = f"kept as {report['keep_dtype']}"
    items["protocol (JSON)"] = json.dumps(p, sort_keys=True)
    return _dl(items)


def _provenance(report: dict, created: str | None) -> str:
    m = report["model"]
    items = {"model": m["name"], "source": m.get("source") or "-", "sha256": m.get("file_hash") or "-",
             "measured": report.get("date") or "not recorded (a report written before lowbit recorded dates)",
             "page written": created or datetime.now(timezone.utc).isoformat(timespec="seconds"),
             "lowbit": report.get("lowbit_version", "?") + ("" if report.get("lowbit_version") == __version__ else
                                                            f" (this page by lowbit {__version__})")}
    for name, version in (report.get("versions") or {}).items():
        if name != "lowbit":
            items[name] = version
    return _dl(items)


def _dl(items: dict[str, str]) -> str:
    return "<dl>" + "".join(f"<dt>{_e(k)}</dt><dd>{_e(v)}</dd>" for k, v in items.items()) + "</dl>"


def _e(text) -> str:
    return html.escape(str(text), quote=True)


def report_figures(report: dict, peers: list[dict] | None = None) -> list[tuple[str, str, bytes | None]]:
    """The figures a compare report can show: KL against bits (with peers, from a benchmark JSON), the
    distribution of per-token KL per format, the weight SQNR per layer and format, and the per-layer formats of
    each row quantized with more than one format. A figure the report holds no data for (one written by an older
    lowbit) is (title, a note saying why, None)."""
    from . import plots  # matplotlib only when a page is drawn

    out = []
    try:  # no row with a positive error (every format failed, or all exact) has no point on a log axis
        kl = plots.kl_vs_bits(report, peers=peers)
    except ValueError:
        kl = None
    if kl is not None:
        out.append(("quality against size", "Each configuration's mean error against the bits per weight it "
                    "stores; the line joins the Pareto front (nothing else is both smaller and better).",
                    png_bytes(kl)))
    out += _more_figures(report, plots)
    for row in report["results"]:
        if len(row.get("layer_formats") or {}) > 1:
            out.append((f"layers of {row['format']}", f"How the layers of {row['format']} are stored.",
                        png_bytes(plan_layers(report, row=row["format"]))))
    return out


def _more_figures(report: dict, plots) -> list[tuple[str, str, bytes | None]]:
    """The per-token KL distribution (causal LMs) and the per-layer SQNR heatmap, or a note where the report has
    no data for them."""
    out = []
    if report["protocol"].get("kind") == "causal-lm":
        try:
            png = png_bytes(plots.kl_tail(report))
            out.append(("distribution of per-token KL", "For each format, the share of scored tokens whose KL "
                        "divergence exceeds x: a curve further right has more tokens predicted badly; its last "
                        "point is the worst token (the table's KL max).", png))
        except InputError as e:
            out.append(("distribution of per-token KL", f"Not drawn: {e}.", None))
    try:
        png = png_bytes(sqnr_heatmap(compare_errors(report)))
        out.append(("weight error per layer", "Each quantized layer's weight SQNR (dB, higher is better): the "
                    "weight it computes with against the float weight it was rounded from; colour is a layer "
                    "against its format's mean, so the layers each format rounds worst stand out.", png))
    except InputError as e:
        out.append(("weight error per layer", f"Not drawn: {e}.", None))
    return out


def write_report(report: dict, path: str | os.PathLike, peers: list[dict] | None = None) -> Path:
    """Draw the figures and write the page to ``path`` atomically."""
    page = render(report, report_figures(report, peers))
    path = Path(path)
    with atomic_file(path) as tmp:
        tmp.write_text(page, encoding="utf-8")
    return path
