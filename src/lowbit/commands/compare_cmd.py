"""`lowbit compare`: quantize one model to several formats; print what each costs and loses."""

from __future__ import annotations

from ..evaluate import DEFAULT_FORMATS, compare
from ..io.atomic import write_json
from ..nn.surgery import QuantConfig
from ..report.table import compare_table
from .common import add_model_arg, add_protocol_args, check_protocol_args, console, load


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="quantize a model to several formats and measure the loss of each")
    add_model_arg(p)
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated FORMAT[/BLOCK][+dq], e.g. nf4,int4/128,nf4+dq (default: %(default)s)")
    add_protocol_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    configs = [QuantConfig.parse(label) for label in args.formats.split(",") if label.strip()]
    if not configs:
        raise ValueError("--formats names no format")
    check_protocol_args(args)
    con = console()
    model, tokenizer, info = load(args.model, con)
    report = compare(model, tokenizer, info, configs, text=args.text, window=args.window, windows=args.windows)
    con.print(compare_table(report))
    if args.json:
        write_json(args.json, report)
        con.print(f"wrote {args.json}")
    return 0
