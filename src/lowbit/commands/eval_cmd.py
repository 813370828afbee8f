"""`lowbit eval DIR`: score a model saved by `lowbit quantize` against its original."""

from __future__ import annotations

from ..evaluate import evaluate_saved
from ..files.atomic import write_json
from ..files.outputs import check_outputs
from ..io.model_io import read_meta
from ..models.lazy import load_lazily
from ..report.table import compare_table, layer_notes
from .common import add_protocol_args, add_verify_arg, check_protocol_args, console, load


def add_parser(sub) -> None:
    p = sub.add_parser("eval")
    p.add_argument("directory", metavar="DIR", help="a directory written by `lowbit quantize`")
    add_protocol_args(p)
    add_verify_arg(p)  # the original model's files, loaded for the reference
    p.set_defaults(run=run)


def run(args) -> int:
    read_meta(args.directory)  # a one-line error for a wrong DIR before anything else
    check_protocol_args(args)
    check_outputs([args.json], [args.text, args.directory])
    con = console()
    report = evaluate_saved(args.directory, text=args.text, window=args.window, windows=args.windows,
                            load=lambda source: load(source, con,
                                                     loader=lambda spec: load_lazily(spec, verify=args.verify)))
    con.print(compare_table(report, width=con.width))
    for line in layer_notes(report):
        con.print(line)
    if args.json:
        write_json(args.json, report)
        con.print(f"wrote {args.json}")
    return 0
