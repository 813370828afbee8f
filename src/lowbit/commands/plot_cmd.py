"""`lowbit plot FIGURE`: a figure (PNG, SVG or PDF) of a layer's levels, or of what another command wrote as JSON.

Each figure is drawn by ``lowbit.report.plots`` from the data alone; matplotlib is loaded only here, when a
figure is drawn. Every input is checked (the JSON's kind, the output's suffix and directory) before a model loads.
"""

from __future__ import annotations

import difflib

from ..errors import InputError
from ..files.outputs import check_outputs
from ..report import layer_plots, plots, result_json  # matplotlib only inside their drawing functions
from ..report.figure import check_suffix, save_figure
from ..workflows.levels import layer_levels_data, level_config
from .common import add_model_arg, check_writable_file, console, load

DEFAULT_LAYER = "model.layers.0.mlp.down_proj"
DEFAULT_LEVEL_FORMATS = "int4,nf4,fp4_e2m1,qq4"


def add_parser(sub) -> None:
    p = sub.add_parser("plot",
                       description="Draw a figure as PNG, SVG or PDF (from the -o file's suffix). `levels` quantizes "
                                   "one layer of a model; the others read what another lowbit command wrote with "
                                   "--json.")
    figures = p.add_subparsers(dest="figure", required=True, metavar="FIGURE")

    levels = figures.add_parser("levels", help="a layer's weight histogram with one block's levels per format")
    add_model_arg(levels)
    levels.add_argument("--layer", default=DEFAULT_LAYER, metavar="NAME",
                        help="the nn.Linear to draw, by name or a dotted tail of it, e.g. layers.0.mlp.down_proj "
                             "(default: %(default)s)")
    levels.add_argument("--formats", default=DEFAULT_LEVEL_FORMATS, metavar="LABELS",
                        help="comma-separated FORMAT[/BLOCK][+dq][@SEARCH] (default: %(default)s)")
    _output(levels, "levels.png")

    kl = figures.add_parser("kl", help="mean KL against bits per weight, with the Pareto front")
    kl.add_argument("results", metavar="RESULTS.json",
                    help="a `lowbit compare --json` report (or a benchmarks/bench_quality.py --json one)")
    kl.add_argument("--peers", metavar="BENCH.json",
                    help="a benchmarks/bench_quality.py --json report: its peer and llama.cpp rows are drawn too")
    _output(kl, "kl.png")

    errors = figures.add_parser("errors", help="a layers x formats heatmap of weight SQNR (dB)")
    errors.add_argument("report", metavar="ERRORS.json", help="a `lowbit errors --json` report")
    errors.add_argument("--all", action="store_true", help="one row per layer however many there are (default: "
                                                           "per layer up to 48 layers, else per layer kind)")
    _output(errors, "errors.png")

    plan = figures.add_parser("plan", help="each layer's format and bits per weight in a mixed-precision plan")
    plan.add_argument("plan", metavar="PLAN.json",
                      help="a plan (`lowbit quantize --plan` file), a quantized model's directory or lowbit.json, "
                           "or a `lowbit compare --json` report (its row that mixes formats)")
    plan.add_argument("--sensitivity", metavar="S.json",
                      help="a `lowbit sensitivity --json` table: each layer's exact stored bits")
    plan.add_argument("--row", metavar="FORMAT", help="with a compare report: the row to draw")
    _output(plan, "plan.png")

    outliers = figures.add_parser("outliers", help="outlier input features per layer, systematic ones marked")
    outliers.add_argument("report", metavar="OUTLIERS.json", help="a `lowbit outliers --json` report")
    _output(outliers, "outliers.png")
    p.set_defaults(run=run)


def _output(p, default: str) -> None:
    p.add_argument("-o", "--output", default=default, metavar="FILE",
                   help="the figure to write: .png, .svg or .pdf (default: %(default)s)")


def run(args) -> int:
    check_suffix(args.output)
    check_writable_file(args.output)
    read = [getattr(args, name, None) for name in ("results", "peers", "report", "plan", "sensitivity")]
    check_outputs([args.output], read)  # levels' model: in levels_data, which loads it
    if args.figure == "levels":
        fig = plots.layer_levels(levels_data(args))
    elif args.figure == "kl":
        report = result_json.read_json(args.results, "lowbit plot kl", ("compare", "bench"))
        peers = result_json.read_json(args.peers, "lowbit plot kl --peers", ("bench",)) if args.peers else None
        fig = plots.kl_vs_bits(report, peers)
    elif args.figure == "errors":
        errors = result_json.read_json(args.report, "lowbit plot errors", ("errors",))
        fig = layer_plots.sqnr_heatmap(errors, True if args.all else None)
    elif args.figure == "plan":
        data = result_json.read_json(args.plan, "lowbit plot plan", ("plan", "saved", "compare", "bench", "row"))
        table = (result_json.read_json(args.sensitivity, "lowbit plot plan --sensitivity", ("sensitivity",))
                 if args.sensitivity else None)
        if args.row is not None and result_json.json_kind(data) not in ("compare", "bench"):
            raise InputError(f"--row picks a row of a compare report; {args.plan} is {result_json.describe(data)}")
        fig = layer_plots.plan_layers(data, table, args.row)
    else:
        fig = layer_plots.outlier_counts(result_json.read_json(args.report, "lowbit plot outliers", ("outliers",)))
    save_figure(fig, args.output)
    console().print(f"wrote {args.output}")
    return 0


def levels_data(args) -> dict:
    labels = [label.strip() for label in args.formats.split(",") if label.strip()]
    if not labels:
        raise InputError("--formats names no format")
    for label in labels:
        level_config(label)  # a bad label fails before the model loads
    from ..io.model_io import local_source  # here: the other figures load no model code

    check_outputs([args.output], [local_source(args.model)])
    model, _, _ = load(args.model, console(), verify=args.verify)
    name, linear = find_linear(model, args.layer)
    return layer_levels_data(linear.weight, labels, layer=name)


def find_linear(model, wanted: str):
    """``(name, module)`` of the nn.Linear named ``wanted`` or whose name ends with ``.wanted``; else one error
    naming the closest layers."""
    from torch import nn

    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if wanted in linears:
        return wanted, linears[wanted]
    tails = [name for name in linears if name.endswith("." + wanted)]
    if len(tails) == 1:
        return tails[0], linears[tails[0]]
    if tails:
        raise InputError(f"--layer {wanted} matches {len(tails)} layers ({', '.join(tails[:4])}"
                         f"{', ...' if len(tails) > 4 else ''}): give more of the name")
    other = dict(model.named_modules()).get(wanted)
    if other is not None:
        raise InputError(f"--layer {wanted} is a {type(other).__name__}, not an nn.Linear")
    close = difflib.get_close_matches(wanted, list(linears), n=4, cutoff=0.4)
    if not close:
        close = [name for name in linears if name.split(".")[-1] == wanted.split(".")[-1]][:4] or list(linears)[:4]
    raise InputError(f"the model has no nn.Linear named {wanted}; close names: {', '.join(close)}")
