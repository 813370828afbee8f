"""`lowbit quantize`: quantize a model and write it to a directory (safetensors + JSON)."""

from __future__ import annotations

import math
import sys
from contextlib import suppress

from .. import limits as L
from ..calibration.importance import calibration_batches
from ..cluster.session import add_ray_arg, pool
from ..errors import InputError, LowbitError
from ..eval.blockwise import Dequantized, Onloaded
from ..eval.protocol import DEFAULT_WINDOW, DEFAULT_WINDOWS, scored_count
from ..evaluate import Evaluation, materialize, model_limits
from ..files.partial import check_leftover, finished_shards, partial_path
from ..files.shards import SHARD_BYTES
from ..io.model_io import check_output, load_quantized, local_source, read_meta, save_quantized
from ..io.streamed import quantize_to_directory
from ..layers.keep_dtype import parse_keep_dtype
from ..layers.surgery import linears
from ..models.loader import CAUSAL_LM
from ..models.synthetic import parse_size
from ..planning.budget import check_table, plan_for_budget
from ..planning.plan import DEFAULT_EXCLUDE, QuantPlan
from ..planning.sensitivity import (
    DEFAULT_CANDIDATES,
    SENSITIVITY_CALIBRATE,
    Sensitivity,
    candidate,
    measure_sensitivity,
)
from ..report.layers import budget_table
from ..report.table import layer_notes
from ..workflows import run as workflow
from .common import (
    add_calibrate_arg,
    add_keep_dtype_arg,
    add_model_arg,
    add_selection_args,
    check_calibrate_arg,
    check_protocol_args,
    console,
    load,
    parse_plans,
    source_dtype,
)


def add_parser(sub) -> None:
    p = sub.add_parser("quantize")
    add_model_arg(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--format", metavar="FORMAT[/BLOCK][+dq][+awq][+had][+gptq][+cb][@SEARCH]",
                      help="a format label, e.g. nf4, int4/128, nf4+dq, int4_asym@hqq, nf4@amse, nf4/32+dq+gptq@amse "
                           "(see `lowbit formats`; README: GPTQ, +had, +awq, +cb)")
    what.add_argument("--plan", metavar="PLAN.json",
                      help='per-layer rules, first match wins: {"rules": [{"pattern": "lm_head", "keep": true}, '
                           '{"pattern": "*", "format": "q4_k", "fallback": "q8_0"}]} (README: per-layer plans)')
    what.add_argument("--budget", type=L.BUDGET.arg("--budget"), metavar="BITS",
                      help="mixed precision: a format per layer from --candidates minimizing the predicted KL at no "
                           f"more than BITS bits per weight (stored bytes; {L.BUDGET.text()}); the result is scored "
                           "after")
    p.add_argument("--candidates", metavar="LABELS", default=",".join(DEFAULT_CANDIDATES),
                   help="with --budget: the formats a layer may take (default: %(default)s)")
    p.add_argument("--sensitivity", metavar="FILE.json",
                   help="with --budget: a table from `lowbit sensitivity --json` instead of measuring one "
                        f"({SENSITIVITY_CALIBRATE} calibration windows, KL of each layer's median candidate)")
    p.add_argument("--block-size", type=L.BLOCK_SIZE.arg("--block-size"),
                   help=f"weights per block (default: the format's; {L.BLOCK_SIZE.text()}); same as FORMAT/BLOCK")
    p.add_argument("--method", choices=["gptq"],
                   help="gptq: GPTQ (arXiv 2210.17323) on the calibration windows (default 64); same as FORMAT+gptq")
    p.add_argument("--double-quant", action="store_true", help="compress the per-block scales (bitsandbytes); "
                   "same as FORMAT+dq")
    add_selection_args(p)
    add_keep_dtype_arg(p)
    add_calibrate_arg(p)
    p.add_argument("--text", metavar="FILE", help="with --calibrate or @amse: the evaluation text whose tokens after "
                   "the scored windows calibrate (default: Python's pydoc topics)")
    p.add_argument("--window", type=L.WINDOW.arg("--window"), default=DEFAULT_WINDOW,
                   help=f"tokens per window (default {DEFAULT_WINDOW}; {L.WINDOW.text()})")
    p.add_argument("--windows", type=L.WINDOWS.arg("--windows"), default=DEFAULT_WINDOWS,
                   help=f"scored windows that calibration skips (default {DEFAULT_WINDOWS}, as `lowbit compare`; "
                        f"{L.WINDOWS.text()})")
    p.add_argument("--strict", action="store_true",
                   help="with --plan: a rule that matches no layer is an error, not a warning")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to create")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it is empty or an earlier lowbit output (never anything else), and discard "
                        "what an interrupted run left in DIR.partial")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted run writing DIR (killed, or stopped by a full disk) from the last "
                        "shard it finished (a calibrated plan: the last transformer block all of whose layers it "
                        "holds), kept in DIR.partial, with the same settings; the files are those an uninterrupted "
                        "run writes (without DIR.partial: from the start)")
    p.add_argument("--shard-size", metavar="SIZE",
                   help=f"largest safetensors file, bytes or with KB/MB/GB (default {SHARD_BYTES} bytes, 1 GiB); a "
                        "resumed run goes on from the last finished one")
    add_ray_arg(p)
    p.set_defaults(run=run)


def run(args) -> int:
    if args.budget is None and (args.sensitivity or args.candidates != ",".join(DEFAULT_CANDIDATES)):
        raise InputError("--candidates and --sensitivity choose formats under a --budget; there is no --budget")
    if args.budget is not None:
        if args.block_size is not None or args.double_quant or args.method:
            raise InputError("--budget picks each layer's format from --candidates: --block-size, --double-quant "
                             "and --method belong in the candidate labels (e.g. nf4/32+dq+gptq@amse)")
        if args.sensitivity and (args.include or args.exclude is not None):
            raise InputError("--sensitivity's table already holds the layers to plan: --include and --exclude "
                             "belong to `lowbit sensitivity`")
        if args.resume:
            raise InputError("--resume continues a run of --format or --plan; --budget measures and chooses its "
                             "plan afresh: run it without --resume")
        return run_budget(args)
    if args.plan is not None:
        if (args.block_size is not None or args.double_quant or args.include or args.exclude is not None
                or args.method):
            raise InputError("--plan says each layer's format: --block-size, --double-quant, --method, --include "
                             "and --exclude belong in its rules")
        plan = QuantPlan.load(args.plan)
    else:
        (plan,) = parse_plans([args.format], args, block_size=args.block_size, double_quant=args.double_quant,
                              method=args.method)
    check_calibrate_arg(args, [plan])
    keep = parse_keep_dtype(args.keep_dtype) if args.keep_dtype else None
    shard_bytes = parse_size(args.shard_size) if args.shard_size is not None else SHARD_BYTES
    if plan.needs_calibration:
        check_protocol_args(args)
    # before minutes of work, not after; first what an interrupted run left (gone if it completed the output)
    leftover = check_leftover(args.output, resume=args.resume, overwrite=args.overwrite)
    check_output(args.output, overwrite=args.overwrite, source=local_source(args.model))
    con = console()
    # one layer's weight (rounding alone) or one block's (calibrated methods) read at a time: lowbit.models.lazy
    from ..models.lazy import load_lazily

    model, tokenizer, info, weights = load(args.model, con, loader=lambda spec: load_lazily(spec, verify=args.verify))
    keep = keep or source_dtype(info.source)
    if args.plan is not None:
        unused = plan.unused(names[0] for names, _ in linears(model))
        if unused and args.strict:
            raise InputError(f"{unused[0]} (--strict){f'; and {len(unused) - 1} more' if len(unused) > 1 else ''}")
        for message in unused:
            con.print(f"warning: {message}", style="yellow")
    elif args.strict:
        raise InputError("--strict checks a --plan's rules; there is no --plan")
    calibration = calibration_of(args, tokenizer, info) if plan.needs_calibration else None
    if weights is None:
        with pool(args.ray) as workers:
            report = workflow.run(model, plan, calibration, pool=workers)
        save_quantized(model, tokenizer, info, report, plan, args.output, overwrite=args.overwrite, keep_dtype=keep,
                       shard_bytes=shard_bytes)
    else:  # read, rounded and written tensor by tensor
        try:
            with pool(args.ray) as workers:
                report = quantize_to_directory(model, weights, tokenizer, info, plan, args.output,
                                               overwrite=args.overwrite, resume=args.resume, keep_dtype=keep,
                                               shard_bytes=shard_bytes, calibration=calibration, pool=workers)
        except BaseException as e:
            kept = False
            with suppress(LowbitError, OSError):  # a note on the way out: nothing may hide the error itself
                kept = not isinstance(e, Exception) and finished_shards(args.output)  # Ctrl-C, SIGTERM
            if kept:
                print(f"lowbit quantize: the finished shards stay in {partial_path(args.output)}; the same command "
                      "with --resume continues", file=sys.stderr)
            raise
    after = read_meta(args.output)["quantize"]["model_bytes_after"]  # the unquantized tensors at --keep-dtype
    row = {"format": plan.label, "layer_formats": report.format_counts, "fallbacks": dict(report.fallbacks)}
    for line in layer_notes({"results": [row]}):
        con.print(line)
    con.print(
        f"{plan.label}: {len(report.layers)} layers, {report.bits_per_weight:.3f} bits/weight; model "
        f"{report.model_bytes_before / 1e6:.1f} MB -> {after / 1e6:.1f} MB "
        f"in {report.seconds:.1f} s; wrote {args.output}"
        + (f" (continuing the {leftover} shards an interrupted run finished)" if leftover and args.resume else "")
    )
    return 0


def run_budget(args) -> int:
    """``--budget``: measure (or read) the sensitivity table, choose the plan, quantize, save, score."""
    candidates = [label for label in args.candidates.split(",") if label.strip()]
    for label in candidates:
        candidate(label)  # a bad label fails before the model loads
    if not (args.budget > 0 and math.isfinite(args.budget)):
        raise InputError(f"--budget is a positive number of bits per weight, got {args.budget}")
    shard_bytes = parse_size(args.shard_size) if args.shard_size is not None else SHARD_BYTES
    table = Sensitivity.load(args.sensitivity) if args.sensitivity else None
    # with a table, a budget it cannot meet or a candidate it lacks fails before the model loads
    chosen = plan_for_budget(None, args.budget, candidates=candidates, sensitivity=table) if table else None
    check_protocol_args(args)
    check_output(args.output, overwrite=args.overwrite, source=local_source(args.model))
    con = console()
    from ..models.lazy import load_lazily  # one block's weights read at a time, as a plain quantize

    model, tokenizer, info, weights = load(args.model, con, loader=lambda spec: load_lazily(spec, verify=args.verify))
    keep = parse_keep_dtype(args.keep_dtype) if args.keep_dtype else source_dtype(info.source)
    if info.kind != CAUSAL_LM:
        raise InputError(f"--budget weighs formats by KL of next-token distributions; {info.name} is an encoder")
    calibration = calibration_of(args, tokenizer, info)
    with pool(args.ray) as workers:  # the table's cells, then the layers, as tasks on a cluster
        original = (lambda: model) if weights is None else (lambda: Onloaded(model, weights))
        evaluation = Evaluation(info, tokenizer, original, text=args.text, window=args.window, windows=args.windows,
                                **model_limits(model))  # the reference, before any layer changes
        if table is None:
            batches, _ = calibration_batches(tokenizer, info.kind, args.text, window=args.window,
                                             scored=calibration.scored, count=SENSITIVITY_CALIBRATE)
            exclude = tuple(args.exclude) if args.exclude is not None else DEFAULT_EXCLUDE
            table = measure_sensitivity(model, candidates, batches, include=tuple(args.include or ()), exclude=exclude,
                                        weights=weights, pool=workers, spec=args.model, file_hash=info.file_hash)
            chosen = plan_for_budget(None, args.budget, candidates=candidates, sensitivity=table)
        else:
            check_table(table, info, model, args.sensitivity)
        con.print(budget_table(chosen))
        plan = chosen.plan
        if weights is None:
            report = workflow.run(model, plan, calibration, pool=workers)
            save_quantized(model, tokenizer, info, report, plan, args.output, overwrite=args.overwrite,
                           keep_dtype=keep, shard_bytes=shard_bytes)
            quantized = materialize(model)
        else:  # read, quantized and written block by block; then scored as saved, a block at a time
            report = quantize_to_directory(model, weights, tokenizer, info, plan, args.output, overwrite=args.overwrite,
                                           keep_dtype=keep, shard_bytes=shard_bytes,
                                           calibration=calibration if plan.needs_calibration else None, pool=workers)
            quantized = Dequantized(load_quantized(args.output)[0])
        con.print(f"{plan.label}: {len(report.layers)} layers, {report.bits_per_weight:.4f} bits/weight "
                  f"(budget {args.budget:g}) in {report.seconds:.1f} s; wrote {args.output}")
        scores = evaluation.score(quantized, label="scoring the plan")
        con.print(f"KL mean {scores['kl_mean']:.5f} measured on the {evaluation.protocol.windows} scored windows; "
                  f"{chosen.predicted_kl:.5f} predicted (the layers' KL added up); same top-1 {scores['top1']:.2%}")
        return 0


def calibration_of(args, tokenizer, info) -> workflow.Calibration:
    """The calibration inputs the arguments name: ``--calibrate`` windows of ``--text`` after what
    `lowbit compare` scores with ``--windows``."""
    return workflow.Calibration(tokenizer, info.kind, args.text, window=args.window,
                       scored=scored_count(info.kind, args.text, args.windows), count=args.calibrate)
