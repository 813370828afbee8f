"""`lowbit qat`: quantization-aware training (LSQ) on the calibration split, saved like `lowbit quantize` output."""

from __future__ import annotations

import shutil
import sys

from .. import limits as L
from ..errors import InputError
from ..eval.protocol import DEFAULT_WINDOW, DEFAULT_WINDOWS, read_text
from ..files.outputs import check_outputs
from ..io.model_io import check_output, local_source, save_quantized
from ..layers.keep_dtype import parse_keep_dtype
from ..methods.gptq_model import GPTQ_CALIBRATE
from ..methods.qat import check_qat_config
from ..methods.qat_train import LOSSES, QATSettings
from ..models.loader import CAUSAL_LM
from ..planning.plan import QuantPlan
from ..workflows.qat import (
    DEFAULT_INIT,
    DEFAULT_LR,
    DEFAULT_SCALE_LR,
    DEFAULT_STEPS,
    INIT_CHOICES,
    TRAIN_WINDOW,
    check_windows,
    checkpoint_dir,
    train_quantized,
    training_text,
)
from .common import add_keep_dtype_arg, add_model_arg, add_selection_args, console, load, parse_plans, source_dtype


def add_parser(sub) -> None:
    p = sub.add_parser("qat")
    add_model_arg(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--format", metavar="FORMAT[/BLOCK]",
                      help="a format with a learnable grid, e.g. int3, int4/64, int4/64+had (Hadamard-rotated), int2, "
                           "nf4, int4_asym (LSQ+)")
    what.add_argument("--plan", metavar="PLAN.json", help="per-layer rules, as `lowbit quantize --plan`")
    p.add_argument("--block-size", type=L.BLOCK_SIZE.arg("--block-size"),
                   help=f"weights per block (default: the format's; {L.BLOCK_SIZE.text()}); same as FORMAT/BLOCK")
    p.add_argument("--steps", type=L.STEPS.arg("--steps"), default=DEFAULT_STEPS,
                   help=f"training steps of --train-window tokens (default {DEFAULT_STEPS}: with --init gptq about 25 "
                        f"minutes for SmolLM2 on 2 cores; {L.STEPS.text()})")
    p.add_argument("--lr", type=L.LEARNING_RATE.arg("--lr"), default=DEFAULT_LR,
                   help=f"Adam step of the weights (default {DEFAULT_LR:g}; {L.LEARNING_RATE.text()})")
    p.add_argument("--scale-lr", type=L.LEARNING_RATE.arg("--scale-lr"), default=DEFAULT_SCALE_LR,
                   help=f"Adam step of the quantizers' steps and offsets (default {DEFAULT_SCALE_LR:g}; "
                        f"{L.LEARNING_RATE.text()})")
    p.add_argument("--loss", choices=LOSSES, default="kl",
                   help="kl: distil the original model's next-token distribution (default); ce: the text's tokens")
    p.add_argument("--init", choices=INIT_CHOICES, default=DEFAULT_INIT,
                   help=f"where training starts (default {DEFAULT_INIT}): gptq (GPTQ's rounding with @amse on "
                        f"{GPTQ_CALIBRATE} windows after the scored ones: weights and steps), mse (searched steps), "
                        "rule (the format's own steps), lsq (2 mean|w| / sqrt(Qp))")
    p.add_argument("--train-window", type=L.TRAIN_WINDOW.arg("--train-window"), default=TRAIN_WINDOW,
                   help=f"tokens per training step (default {TRAIN_WINDOW}; {L.TRAIN_WINDOW.text()})")
    p.add_argument("--text", metavar="FILE", help="the evaluation text; training reads only its tokens after the "
                   "scored windows (default: Python's pydoc topics)")
    p.add_argument("--window", type=L.WINDOW.arg("--window"), default=DEFAULT_WINDOW,
                   help=f"scored window (default {DEFAULT_WINDOW}; {L.WINDOW.text()})")
    p.add_argument("--windows", type=L.QAT_SKIPPED_WINDOWS.arg("--windows"), default=DEFAULT_WINDOWS,
                   help=f"scored windows training skips (default {DEFAULT_WINDOWS}, as `lowbit compare`; "
                        f"{L.QAT_SKIPPED_WINDOWS.text()})")
    add_selection_args(p)
    add_keep_dtype_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to create")
    p.add_argument("--overwrite", action="store_true",
                   help="replace DIR if it is an earlier lowbit output, as `lowbit quantize --overwrite`")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint (DIR.qat-checkpoint), same arguments")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.plan is not None:
        if args.block_size is not None or args.include or args.exclude is not None:
            raise InputError("--plan says each layer's format: --block-size, --include and --exclude belong in its "
                             "rules")
        plan = QuantPlan.load(args.plan)
    else:
        (plan,) = parse_plans([args.format], args, block_size=args.block_size)
    for c in plan.configs:
        check_qat_config(c)
    settings = QATSettings(steps=args.steps, lr=args.lr, scale_lr=args.scale_lr, loss=args.loss)
    check_windows(args.window, args.windows, args.train_window)
    read_text(args.text)  # a missing or unreadable text fails before the model loads
    check_output(args.output, overwrite=args.overwrite, source=local_source(args.model))
    checkpoint = checkpoint_dir(args.output)
    check_outputs([args.output, checkpoint], [args.text, args.plan, local_source(args.model)])
    if args.resume and not checkpoint.is_dir():
        raise InputError(f"--resume: no checkpoint at {checkpoint}")
    if not args.resume and checkpoint.exists():
        raise FileExistsError(f"{checkpoint} holds an interrupted run: add --resume to continue it, or remove it")
    con = console()
    model, tokenizer, info = load(args.model, con, verify=args.verify)
    if info.kind != CAUSAL_LM:
        raise InputError(f"lowbit qat trains causal language models; {info.name} is an encoder")
    keep = parse_keep_dtype(args.keep_dtype) if args.keep_dtype else source_dtype(info.source)
    data = training_text(tokenizer, args.text, window=args.window, scored=args.windows, train_window=args.train_window)
    try:
        report, record = train_quantized(model, tokenizer, info.file_hash, plan, settings, data, init=args.init,
                                         checkpoint=checkpoint, resume=args.resume)
    except KeyboardInterrupt:
        if checkpoint.is_dir():
            print(f"lowbit qat: the checkpoint {checkpoint} is kept: the same command with --resume continues it",
                  file=sys.stderr)
        raise
    label = f"{plan.label} qat"
    save_quantized(model, tokenizer, info, report, plan, args.output, keep_dtype=keep, extra={"qat": record},
                   label=label, overwrite=args.overwrite)
    shutil.rmtree(checkpoint, ignore_errors=True)
    con.print(f"{label}: {len(report.layers)} layers, {report.bits_per_weight:.3f} bits/weight; {settings.steps} "
              f"steps in {record['seconds'] / 60:.1f} min, loss {record['first_loss']:.4f} -> "
              f"{record['last_loss']:.4f}; wrote {args.output} (score it: lowbit eval {args.output})")
    return 0
