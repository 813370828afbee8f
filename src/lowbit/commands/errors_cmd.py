"""`lowbit errors`: how much of each weight matrix each format loses (SQNR, dB), without running the model.

Every selected ``nn.Linear`` weight W is quantized to each format and dequantized to Ŵ;
``lowbit.eval.tensor.tensor_errors(W, Ŵ)`` gives its errors. The table has one row per layer
kind (the layer names with their block numbers written ``*``, e.g. ``model.layers.*.mlp.down_proj``:
also a ``--layers`` pattern), each the mean SQNR of its layers, then the mean over every layer,
the worst layer, and the stored bits per weight with the Gaussian rate-distortion SQNR at that
rate for comparison (``lowbit.eval.tensor.gaussian_sqnr_bound``). ``--all``: one row per layer.
Means are of the dB figures, every layer counting once. ``--json`` holds every layer's errors.

Activation-weighted searches (``@amse``, ``@ahqq``) need each layer's mean squared input activations
(``lowbit.calibration.importance``): they are collected from the ``--calibrate`` windows right after the ones
``lowbit compare`` scores with the same ``--text/--window/--windows``, so such a format quantizes here
exactly as it does there. Every format then also gets an activation-weighted SQNR
(``tensor_errors(..., weights=importance)``), the diagonal approximation of each layer's output SQNR.

``--ray``: each layer's rounding and errors a Ray task (``lowbit.cluster.session``), the numbers the same.
"""

from __future__ import annotations

import re
from dataclasses import asdict
from types import SimpleNamespace

from rich.table import Table

from .. import __version__
from .. import limits as L
from ..cluster.session import add_ray_arg, pool
from ..errors import InputError
from ..evaluate import DEFAULT_FORMATS
from ..files.atomic import write_json
from ..files.outputs import check_outputs
from ..io.model_io import local_source
from ..planning.plan import QuantPlan
from ..workflows import errors as workflow
from .common import add_model_arg, add_protocol_args, check_protocol_args, console, load, parse_plans


def add_parser(sub) -> None:
    p = sub.add_parser("errors",
                       description="Quantize every selected nn.Linear weight to each format and print its SQNR "
                                   "(signal to quantization noise, dB; higher is better): one row per layer kind "
                                   "(mean over its layers; --all: one per layer), the mean over all layers, the "
                                   "worst layer, and each format's stored bits per weight. The model runs only "
                                   "for activation-weighted searches (@amse, @ahqq), on calibration text.")
    add_model_arg(p)
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated FORMAT[/BLOCK][+dq][@SEARCH], e.g. nf4,int4/128,nf4+dq,int4_asym/64@hqq "
                        "(default: %(default)s)")
    p.add_argument("--layers", action="append", metavar="PATTERN",
                   help="measure only the nn.Linear layers whose name (or a dotted tail of it) matches this fnmatch "
                        "pattern, e.g. 'mlp.*', 'model.layers.0.*', 'lm_head' (repeatable; default: every layer "
                        "but lm_head)")
    p.add_argument("--all", action="store_true", help="one row per layer instead of one per layer kind")
    add_protocol_args(p)  # --text/--window/--windows place the calibration windows as lowbit compare does
    p.add_argument("--calibrate", type=L.CALIBRATE.arg("--calibrate"), metavar="N",
                   help="calibration windows for activation-weighted searches (@amse, @ahqq): the N windows of "
                        f"--window tokens right after those lowbit compare scores (default 16; {L.CALIBRATE.text()})")
    add_ray_arg(p)  # each layer's rounding and errors a Ray task
    p.set_defaults(run=run)


def run(args) -> int:
    """Exit 0 when every format was measured, 1 when some could not be applied (the table says why)."""
    labels = [label for label in args.formats.split(",") if label.strip()]
    if not labels:
        raise InputError("--formats names no format")
    # --layers selects exactly what it matches, lm_head too; without it, QuantPlan.uniform's default (all but lm_head)
    selection = SimpleNamespace(include=args.layers, exclude=[] if args.layers else None)
    plans = parse_plans(labels, selection)
    workflow.check_measurable(plans)  # before the model loads
    _check_calibrate(args.calibrate, plans)
    check_protocol_args(args)  # --window/--windows/--text and the --json path, before the model loads
    check_outputs([args.json], [args.text, local_source(args.model)])
    con = console()
    model, tokenizer, info = load(args.model, con, verify=args.verify)
    importance, calibration = workflow.calibration(model, tokenizer, info, args.text, window=args.window,
                                                   windows=args.windows, count=args.calibrate)
    with pool(args.ray) as workers:
        measured = workflow.measure(model, plans, patterns=args.layers, importance=importance, pool=workers)
    report = {"lowbit_version": __version__, "model": asdict(info), **measured,
              **({"calibration": calibration} if calibration else {})}
    con.print(errors_table(report, per_layer=args.all))
    if args.json:
        write_json(args.json, report)
        con.print(f"wrote {args.json}")
    return 1 if any("error" in f for f in report["formats"]) else 0


def _check_calibrate(count: int | None, plans: list[QuantPlan]) -> None:
    if count is not None and count < 1:
        raise InputError(f"--calibrate needs at least 1 window, got {count}")
    if count is not None and not any(p.needs_calibration for p in plans):
        raise InputError("--calibrate is for activation-weighted searches, and no format asks for one: "
                         "add @amse or @ahqq to a format, e.g. nf4@amse")


def errors_table(report: dict, *, per_layer: bool = False) -> Table:
    """``report``: what ``run`` writes as JSON. Rows: layer kinds (or layers), mean, worst, bits, bound."""
    ok = [f for f in report["formats"] if "error" not in f]
    names = [layer["name"] for layer in report["layers"]]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name if per_layer else layer_kind(name), []).append(i)
    title = f"{report['model'].get('name') or report['model']['source']}: weight SQNR (dB)"
    table = Table(title=title if per_layer else f"{title}, each kind's mean")
    table.add_column("layer" if per_layer else "layer kind", no_wrap=True)
    table.add_column("layers", justify="right")
    for f in ok:
        table.add_column(f["format"], justify="right", no_wrap=True)

    def row(label, count, cells, style=None):
        table.add_row(label, count, *cells, style=style)

    for key, members in groups.items():
        row(key, str(len(members)), (_db(sum(f["layers"][i]["sqnr_db"] for i in members) / len(members)) for f in ok))
    table.add_section()
    row("mean", str(len(names)), (_db(f["mean_sqnr_db"]) for f in ok), style="bold")
    row("worst layer", "", (_db(f["min_sqnr_db"]) for f in ok))
    if ok and "mean_weighted_sqnr_db" in ok[0]:
        row("mean, activation-weighted", str(len(names)), (_db(f["mean_weighted_sqnr_db"]) for f in ok))
    row("bits/weight", "", (f"{f['bits_per_weight']:.3f}" for f in ok))
    row("Gaussian bound", "", (_db(f["gaussian_bound_db"]) for f in ok), style="dim")
    notes = [f"{f['format']}: not measured: {f['error']}" for f in report["formats"] if "error" in f]
    notes.append("Gaussian bound: 6.02 dB per bit/weight (Cover & Thomas §10.3)")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def layer_kind(name: str) -> str:
    """``model.layers.12.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``: block numbers become ``*``."""
    return ".".join("*" if re.fullmatch(r"\d+", part) else part for part in name.split("."))


def _db(value: float) -> str:
    return f"{value:.2f}"
