"""`lowbit eval DIR`: score a model saved by `lowbit quantize` against its original."""

from __future__ import annotations

import time

from ..errors import ModelLoadError
from ..evaluate import Evaluation, materialize
from ..io.atomic import write_json
from ..io.model_io import load_quantized, read_meta
from ..models import ModelInfo
from ..nn.surgery import model_weight_bytes
from ..report.table import compare_table
from .common import add_protocol_args, check_protocol_args, console, load


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="score a saved quantized model against the original")
    p.add_argument("directory", metavar="DIR", help="a directory written by `lowbit quantize`")
    add_protocol_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    read_meta(args.directory)  # a one-line error for a wrong DIR before anything else
    check_protocol_args(args)
    con = console()
    with con.status(f"loading {args.directory}", spinner="dots"):
        model, tokenizer, meta = load_quantized(args.directory)
    info = ModelInfo(**meta["model"])

    def original():
        """Only if the reference is not cached: the original model, which must be unchanged."""
        reference, _, found = load(info.source, con)
        if found.file_hash != info.file_hash:
            raise ModelLoadError(f"the original model at {info.source} changed since {args.directory} was written "
                                 "(sha256 differs); its reference cannot be recomputed")
        return reference

    evaluation = Evaluation(info, tokenizer, original, text=args.text, window=args.window, windows=args.windows)
    stored = meta["quantize"]
    result = {"format": meta["config"]["label"], "bits_per_weight": stored["bits_per_weight"],
              "weight_bytes": model_weight_bytes(model), "quantize_seconds": stored["seconds"]}
    start = time.perf_counter()
    result |= evaluation.score(materialize(model), label=f"scoring {result['format']}")
    result["eval_seconds"] = time.perf_counter() - start
    report = {
        "model": meta["model"],
        "protocol": evaluation.protocol_dict,
        "reference": {"weight_bytes": stored["model_bytes_before"], **evaluation.reference_scores()},
        "results": [result],
    }
    con.print(compare_table(report))
    if args.json:
        write_json(args.json, report)
    return 0
