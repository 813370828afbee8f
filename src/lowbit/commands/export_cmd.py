"""`lowbit export DIR --to gguf -o FILE`: write a saved quantized model in another tool's layout."""

from __future__ import annotations

from ..io.gguf_export import export_gguf
from ..io.model_io import load_quantized, read_meta
from .common import check_writable_file, console

TARGETS = ("gguf",)


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="write a saved quantized model as a GGUF file (llama.cpp)")
    p.add_argument("directory", metavar="DIR", help="a directory written by `lowbit quantize`")
    p.add_argument("--to", required=True, choices=TARGETS, help="the target layout")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the file to write")
    p.set_defaults(run=run)


def run(args) -> int:
    meta = read_meta(args.directory)  # a one-line error for a wrong DIR before anything loads
    check_writable_file(args.output)
    con = console()
    with con.status(f"loading {args.directory}", spinner="dots"):
        model, _, meta = load_quantized(args.directory)
    with con.status(f"writing {args.output}", spinner="dots"):
        counts = export_gguf(model, meta["model"]["source"], args.output)
    con.print(f"wrote {args.output}: " + ", ".join(f"{n} {t}" for t, n in sorted(counts.items())) + " tensors")
    return 0
