"""`lowbit compare`: quantize one model to several formats; print what each costs and loses."""

from __future__ import annotations

from ..cluster.session import add_ray_arg, pool
from ..errors import InputError
from ..evaluate import DEFAULT_FORMATS, compare
from ..files.atomic import write_json
from ..files.outputs import check_outputs
from ..io.model_io import local_source
from ..layers.keep_dtype import parse_keep_dtype
from ..models.lazy import load_lazily
from ..planning.plan import QuantPlan
from ..report.html import write_report
from ..report.table import compare_table, layer_notes
from .common import (
    add_calibrate_arg,
    add_keep_dtype_arg,
    add_model_arg,
    add_protocol_args,
    add_selection_args,
    check_calibrate_arg,
    check_protocol_args,
    console,
    load,
    parse_plans,
    source_dtype,
)
from .report_cmd import add_peers_arg, check_report_args


def add_parser(sub) -> None:
    p = sub.add_parser("compare")
    add_model_arg(p)
    p.add_argument("--formats",
                   help="comma-separated FORMAT[/BLOCK][+dq][+awq][+had][+gptq][+cb][@SEARCH], e.g. nf4,int4/128,"
                        f"nf4+dq,int4_asym@hqq,nf4@amse (default: {','.join(DEFAULT_FORMATS)}; none with --plan)")
    p.add_argument("--plan", action="append", metavar="PLAN.json",
                   help="also score a per-layer plan (`lowbit quantize --plan`'s file; repeatable)")
    add_selection_args(p)
    add_keep_dtype_arg(p)
    add_protocol_args(p)
    add_calibrate_arg(p)
    p.add_argument("--report", metavar="FILE.html",
                   help="also write a self-contained HTML report: the table, figures, protocol, model sha256, "
                        "library versions and date")
    add_peers_arg(p)
    add_ray_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    """Exit 0 when every format was scored, 1 when some could not be applied (their rows say why)."""
    formats = args.formats if args.formats is not None else "" if args.plan else ",".join(DEFAULT_FORMATS)
    labels = [label for label in formats.split(",") if label.strip()]
    if not labels and not args.plan:
        raise InputError("--formats names no format")
    plans = parse_plans(labels, args) + [QuantPlan.load(path) for path in args.plan or ()]
    check_calibrate_arg(args, plans)
    keep = parse_keep_dtype(args.keep_dtype) if args.keep_dtype else None
    check_protocol_args(args)
    if args.peers and not args.report:
        raise InputError("--peers is drawn in the --report figures: add --report FILE.html")
    peers = check_report_args(args, args.report) if args.report else None
    check_outputs([args.json, args.report], [args.text, *(args.plan or ()), args.peers, local_source(args.model)])
    con = console()
    # read, quantized and scored one block at a time (lowbit.eval.streamed)
    model, tokenizer, info, weights = load(args.model, con, loader=lambda spec: load_lazily(spec, verify=args.verify))
    if keep is None:
        keep = source_dtype(info.source)
    # each finished row is saved at once: an interrupted run keeps what it measured
    save = (lambda report: write_json(args.json, report)) if args.json else None
    with pool(args.ray) as workers:  # one row a task on a cluster
        report = compare(model, tokenizer, info, plans, text=args.text, window=args.window, windows=args.windows,
                         keep_dtype=keep, on_result=save, calibrate=args.calibrate, weights=weights, pool=workers,
                         spec=args.model)
    con.print(compare_table(report, width=con.width))
    for line in layer_notes(report):
        con.print(line)
    if args.json:
        con.print(f"wrote {args.json}")
    if args.report:
        write_report(report, args.report, peers=peers)
        con.print(f"wrote {args.report}")
    return 1 if any("error" in r for r in report["results"]) else 0
