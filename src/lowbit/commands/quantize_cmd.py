"""`lowbit quantize`: quantize a model and write it to a directory (safetensors + JSON)."""

from __future__ import annotations

from ..io.model_io import check_output, local_source, read_meta, save_quantized
from ..nn.keep_dtype import parse_keep_dtype
from ..nn.surgery import quantize_model
from .common import add_keep_dtype_arg, add_model_arg, add_selection_args, console, load, parse_configs, source_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's linear layers and save it")
    add_model_arg(p)
    p.add_argument("--format", required=True, metavar="FORMAT[/BLOCK][+dq]",
                   help="a format label, e.g. nf4, int4/128, nf4+dq (see `lowbit formats`)")
    p.add_argument("--block-size", type=int, help="weights per block (default: the format's); same as FORMAT/BLOCK")
    p.add_argument("--double-quant", action="store_true", help="compress the per-block scales (bitsandbytes); "
                   "same as FORMAT+dq")
    add_selection_args(p)
    add_keep_dtype_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to create")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it is empty or an earlier lowbit output (never anything else)")
    p.set_defaults(run=run)


def run(args) -> int:
    (config,) = parse_configs([args.format], args, block_size=args.block_size, double_quant=args.double_quant)
    keep = parse_keep_dtype(args.keep_dtype) if args.keep_dtype else None
    # before minutes of work, not after
    check_output(args.output, overwrite=args.overwrite, source=local_source(args.model))
    con = console()
    model, tokenizer, info = load(args.model, con)
    keep = keep or source_dtype(info.source)
    report = quantize_model(model, config)
    save_quantized(model, tokenizer, info, report, config, args.output, overwrite=args.overwrite, keep_dtype=keep)
    after = read_meta(args.output)["quantize"]["model_bytes_after"]  # the unquantized tensors at --keep-dtype
    con.print(
        f"{config.label}: {len(report.layers)} layers, {report.bits_per_weight:.3f} bits/weight; model "
        f"{report.model_bytes_before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
        f"in {report.seconds:.1f} s; wrote {args.output}"
    )
    return 0
