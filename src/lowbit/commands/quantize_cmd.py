"""`lowbit quantize`: quantize a model and write it to a directory (safetensors + JSON)."""

from __future__ import annotations

from ..io.atomic import check_output_dir
from ..io.model_io import save_quantized
from ..nn.surgery import QuantConfig, quantize_model
from .common import add_model_arg, console, load


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model's linear layers and save it")
    add_model_arg(p)
    p.add_argument("--format", required=True, help="a format name (see `lowbit formats`)")
    p.add_argument("--block-size", type=int, help="weights per block (default: the format's)")
    p.add_argument("--double-quant", action="store_true", help="compress the per-block scales (bitsandbytes)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to create")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    p.set_defaults(run=run)


def run(args) -> int:
    config = QuantConfig(format=args.format, block_size=args.block_size, double_quant=args.double_quant)
    check_output_dir(args.output, overwrite=args.overwrite)  # before minutes of work, not after
    con = console()
    model, tokenizer, info = load(args.model, con)
    report = quantize_model(model, config)
    save_quantized(model, tokenizer, info, report, config, args.output, overwrite=args.overwrite)
    con.print(
        f"{config.label}: {len(report.layers)} layers, {report.bits_per_weight:.3f} bits/weight; model "
        f"{report.model_bytes_before / 1e6:.1f} MB -> {report.model_bytes_after / 1e6:.1f} MB "
        f"in {report.seconds:.1f} s; wrote {args.output}"
    )
    return 0
