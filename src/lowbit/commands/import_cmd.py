"""`lowbit import SRC -o DIR`: a GGUF file or a bitsandbytes 4-bit checkpoint as a lowbit model directory."""

from __future__ import annotations

from ..io.importers import import_model
from ..io.model_io import check_output, local_source, save_quantized
from .common import console, load, source_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("import")
    p.add_argument("source", metavar="SRC", help="a .gguf file, or a directory a transformers load_in_4bit "
                                                 "model was saved to (safetensors)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to create")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it is empty or an earlier lowbit output (never anything else)")
    p.set_defaults(run=run)


def run(args) -> int:
    check_output(args.output, overwrite=args.overwrite, source=local_source(args.source))
    con = console()
    got = load(args.source, con, loader=import_model)
    save_quantized(got.model, got.tokenizer, got.info, got.report, got.plan, args.output, overwrite=args.overwrite,
                   keep_dtype=source_dtype(got.info.source))
    r = got.report
    con.print(f"{', '.join(f'{n} {label}' for label, n in r.format_counts.items())} layers, "
              f"{r.bits_per_weight:.3f} bits/weight, bytes as stored in {args.source}; wrote {args.output}")
    return 0
