"""`lowbit outliers`: LLM.int8()'s outlier features, measured on the calibration text."""

from __future__ import annotations

from .. import limits as L
from ..calibration.importance import DEFAULT_CALIBRATE, calibration_batches
from ..eval.outliers import check_analysis_threshold, collect_outliers, outlier_report
from ..eval.protocol import DEFAULT_WINDOWS, scored_count
from ..files.atomic import write_json
from ..files.outputs import check_outputs
from ..io.model_io import local_source
from ..layers.outlier_linear import DEFAULT_THRESHOLD
from ..models.lazy import load_lazily
from ..report.outliers import feature_table, layer_outlier_table
from .common import add_model_arg, add_protocol_args, check_protocol_args, console, load


def add_parser(sub) -> None:
    p = sub.add_parser("outliers")
    add_model_arg(p)
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help=f"outlier magnitude (default {DEFAULT_THRESHOLD:g}, the paper's)")
    p.add_argument("--calibrate", type=L.CALIBRATE.arg("--calibrate"), default=DEFAULT_CALIBRATE, metavar="N",
                   help=f"windows of --window tokens read, right after the --windows scored ones "
                        f"(default {DEFAULT_CALIBRATE}; an encoder reads paragraphs holding as many tokens; "
                        f"{L.CALIBRATE.text()})")
    add_protocol_args(p)
    p.set_defaults(run=run)


def run(args) -> int:
    check_analysis_threshold(args.threshold, "--threshold")  # before the model loads
    check_protocol_args(args)
    check_outputs([args.json], [args.text, local_source(args.model)])
    con = console()
    # read one block at a time (lowbit.models.lazy): the model need not fit in memory
    model, tokenizer, info, weights = load(args.model, con, loader=lambda spec: load_lazily(spec, verify=args.verify))
    batches, label = calibration_batches(tokenizer, info.kind, args.text, window=args.window,
                                         scored=scored_count(info.kind, args.text, args.windows or DEFAULT_WINDOWS),
                                         count=args.calibrate)
    stats = collect_outliers(model, batches, args.threshold, weights=weights,
                             label=label.replace("calibrating", "reading"))
    report = outlier_report(stats, args.threshold, getattr(model.config, "hidden_size", None))
    report = {"model": {"name": info.name, "source": info.source, "file_hash": info.file_hash},
              "text": {"calibrate": args.calibrate, "window": args.window}, **report}
    con.print(layer_outlier_table(report))
    con.print(feature_table(report))
    systematic = report["systematic"]
    con.print(f"{len(systematic)} systematic outlier feature{'s' * (len(systematic) != 1)}"
              f"{': ' + ', '.join(map(str, systematic)) if systematic else ''} "
              f"({len(report['features'])} hidden-state features reached |x| >= {args.threshold:g})")
    if args.json:
        write_json(args.json, report)
        con.print(f"wrote {args.json}")
    return 0
