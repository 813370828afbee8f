"""`lowbit export DIR --to gguf|bnb -o OUT`: write a saved quantized model in another tool's layout."""

from __future__ import annotations

from pathlib import Path

from ..errors import InputError
from ..files.atomic import check_output_dir
from ..files.outputs import check_not_input
from ..io.bnb_checkpoint import export_bnb
from ..io.gguf_export import check_gguf_output, export_gguf
from ..io.model_io import load_quantized, local_source, read_meta
from .common import check_writable_file, console

TARGETS = {"gguf": "a GGUF file (llama.cpp)", "bnb": "a directory in bitsandbytes' 4-bit layout (transformers)"}


def add_parser(sub) -> None:
    p = sub.add_parser("export")
    p.add_argument("directory", metavar="DIR", help="a directory written by `lowbit quantize`")
    p.add_argument("--to", required=True, choices=TARGETS,
                   help="; ".join(f"{k}: {v}" for k, v in TARGETS.items()))
    p.add_argument("-o", "--output", required=True, metavar="OUT",
                   help="the file (gguf) or the new directory (bnb) to write")
    p.add_argument("--overwrite", action="store_true",
                   help="gguf: replace an existing OUT if it is a GGUF file lowbit wrote (never any other file, "
                        "never one of DIR or of the model DIR was quantized from)")
    p.set_defaults(run=run)


def run(args) -> int:
    meta = read_meta(args.directory)  # a one-line error for a wrong DIR before anything loads
    model_info = meta["model"] if isinstance(meta["model"], dict) else {}
    inputs = (args.directory, local_source(model_info.get("source")))  # the GGUF export reads the source too
    if args.to == "gguf":
        check_writable_file(args.output)
        check_not_input(args.output, inputs)
        check_gguf_output(args.output, overwrite=args.overwrite)
    elif args.overwrite:
        raise InputError("--overwrite replaces an earlier GGUF export; bnb export writes a new directory")
    elif Path(args.output).exists():  # check_output_dir's hint names --overwrite, which bnb export does not take
        raise FileExistsError(f"output exists: {args.output}; bnb export writes a new directory")
    else:
        check_output_dir(args.output)
        check_not_input(args.output, inputs)
    con = console()
    with con.status(f"loading {args.directory}", spinner="dots"):
        model, tokenizer, meta = load_quantized(args.directory)
    with con.status(f"writing {args.output}", spinner="dots"):
        if args.to == "gguf":
            counts = export_gguf(model, meta["model"]["source"], args.output, overwrite=args.overwrite)
            what = "tensors"
        else:
            counts = export_bnb(model, tokenizer, args.output)
            what = "linear layers"
    order = sorted(counts.items(), key=lambda kv: (kv[0] in ("F32", "float"), kv[0]))  # the quantized first
    con.print(f"wrote {args.output}: " + ", ".join(f"{n} {t}" for t, n in order) + f" {what}")
    return 0
