"""`lowbit qat`: quantization-aware training (LSQ) on the calibration split, saved like `lowbit quantize` output."""

from __future__ import annotations

import copy
import math
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path

from ..eval.calibration import calibration_batches, calibration_windows
from ..eval.protocol import DEFAULT_WINDOW, DEFAULT_WINDOWS, read_text
from ..io.model_io import check_output, local_source, save_quantized
from ..models.loader import CAUSAL_LM
from ..nn.gptq_model import GPTQ_CALIBRATE, gptq_weights
from ..nn.keep_dtype import parse_keep_dtype
from ..nn.lsq import INITS
from ..nn.plan import QuantPlan
from ..nn.qat import check_qat_config, convert, prepare
from ..nn.qat_train import LOSSES, QATSettings, train
from ..nn.surgery import as_plan
from .common import add_keep_dtype_arg, add_model_arg, add_selection_args, console, load, parse_configs, source_dtype

# The default run: 300 steps of 256 tokens (76,800 tokens, the text after the scored windows read ~0.75
# times), 26 minutes on 2 cores for SmolLM2 (5.1 s a step: the original's forward for the distillation
# target, the student's forward and backward through fake quantization, Adam).
DEFAULT_STEPS = 300
TRAIN_WINDOW = 256  # tokens per step: half the scored window, twice the steps in the same time
DEFAULT_LR, DEFAULT_SCALE_LR = 1e-5, 1e-4
MIN_TRAIN_WINDOWS = 4  # fewer windows after the scored ones is too little text to train on


def add_parser(sub) -> None:
    p = sub.add_parser("qat", help="quantization-aware training (LSQ): train the weights and their steps, then save")
    add_model_arg(p)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--format", metavar="FORMAT[/BLOCK]",
                      help="a format with a learnable grid, e.g. int3, int4/64, int2, nf4, int4_asym (LSQ+)")
    what.add_argument("--plan", metavar="PLAN.json", help="per-layer rules, as `lowbit quantize --plan`")
    p.add_argument("--block-size", type=int, help="weights per block (default: the format's); same as FORMAT/BLOCK")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS,
                   help=f"training steps of --train-window tokens (default {DEFAULT_STEPS}: about 26 minutes for "
                        "SmolLM2 on 2 cores)")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"Adam step of the weights (default {DEFAULT_LR:g})")
    p.add_argument("--scale-lr", type=float, default=DEFAULT_SCALE_LR,
                   help=f"Adam step of the quantizers' steps and offsets (default {DEFAULT_SCALE_LR:g})")
    p.add_argument("--loss", choices=LOSSES, default="kl",
                   help="kl: distil the original model's next-token distribution (default); ce: the text's tokens")
    p.add_argument("--init", choices=(*INITS, "gptq"), default="mse",
                   help="initial steps: mse (searched, default), rule (the format's own), lsq (2 mean|w| / sqrt(Qp)), "
                        f"gptq (GPTQ's rounding with @amse on {GPTQ_CALIBRATE} windows after the scored ones: weights "
                        "and steps start there)")
    p.add_argument("--train-window", type=int, default=TRAIN_WINDOW,
                   help=f"tokens per training step (default {TRAIN_WINDOW})")
    p.add_argument("--text", metavar="FILE", help="the evaluation text; training reads only its tokens after the "
                   "scored windows (default: Python's pydoc topics)")
    p.add_argument("--window", type=int, default=DEFAULT_WINDOW, help=f"scored window (default {DEFAULT_WINDOW})")
    p.add_argument("--windows", type=int, default=DEFAULT_WINDOWS,
                   help=f"scored windows training skips (default {DEFAULT_WINDOWS}, as `lowbit compare`)")
    add_selection_args(p)
    add_keep_dtype_arg(p)
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="directory to create")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its checkpoint (DIR.qat-checkpoint), same arguments")
    p.set_defaults(run=run)


def checkpoint_dir(output) -> Path:
    path = Path(output)
    return path.with_name(path.name + ".qat-checkpoint")


def gptq_start(model, tokenizer, config, args) -> dict:
    """GPTQ's rounding (``+gptq@amse``) of every layer the config trains, on the windows after the scored ones."""
    plan = as_plan(config)
    gplan = QuantPlan(tuple(replace(r, config=None if r.config is None else
                                    replace(r.config, method="gptq", search="amse"), fallback=None)
                            for r in plan.rules), plan.name)
    batches, _ = calibration_batches(tokenizer, CAUSAL_LM, args.text, window=args.window, scored=args.windows,
                                     count=GPTQ_CALIBRATE)
    return {name: r.qweight for name, r in gptq_weights(model, gplan, batches).items()}


def run(args) -> int:
    if args.plan is not None:
        if args.block_size is not None or args.include or args.exclude is not None:
            raise ValueError("--plan says each layer's format: --block-size, --include and --exclude belong in its "
                             "rules")
        config = QuantPlan.load(args.plan)
    else:
        (config,) = parse_configs([args.format], args, block_size=args.block_size)
    for c in as_plan(config).configs:
        check_qat_config(c)
    settings = QATSettings(steps=args.steps, lr=args.lr, scale_lr=args.scale_lr, loss=args.loss)
    if args.train_window < 2 or args.window < 2 or args.windows < 0:
        raise ValueError(f"need --train-window >= 2, --window >= 2 and --windows >= 0, got {args.train_window}, "
                         f"{args.window} and {args.windows}")
    name, body = read_text(args.text)
    check_output(args.output, source=local_source(args.model))
    checkpoint = checkpoint_dir(args.output)
    if args.resume and not checkpoint.is_dir():
        raise ValueError(f"--resume: no checkpoint at {checkpoint}")
    if not args.resume and checkpoint.exists():
        raise FileExistsError(f"{checkpoint} holds an interrupted run: add --resume to continue it, or remove it")
    con = console()
    model, tokenizer, info = load(args.model, con)
    if info.kind != CAUSAL_LM:
        raise ValueError(f"lowbit qat trains causal language models; {info.name} is an encoder")
    keep = parse_keep_dtype(args.keep_dtype) if args.keep_dtype else source_dtype(info.source)
    # the scored tokens are windows * window; training windows start at the first whole one after them
    skip = math.ceil(args.windows * args.window / args.train_window)
    windows = calibration_windows(tokenizer, body, name, window=args.train_window, scored=skip, count=None)
    if len(windows) < MIN_TRAIN_WINDOWS:
        raise ValueError(f"text {name} holds {len(windows)} windows of {args.train_window} tokens after the "
                         f"{args.windows} scored ones; training needs at least {MIN_TRAIN_WINDOWS}: use a longer "
                         "--text or fewer --windows")
    teacher = copy.deepcopy(model) if settings.loss == "kl" else None
    start = time.perf_counter()
    seeds = gptq_start(model, tokenizer, config, args) if args.init == "gptq" else None
    prepare(model, config, init="mse" if seeds else args.init, start=seeds)
    run_id = {"model": info.file_hash, "config": as_plan(config).to_dict(), "init": args.init,
              "text": name, "train_window": args.train_window, "skip": skip}
    try:
        losses = train(model, teacher, windows, settings, checkpoint=checkpoint, resume=args.resume, run=run_id)
    except KeyboardInterrupt:
        if checkpoint.is_dir():
            print(f"lowbit qat: the checkpoint {checkpoint} is kept: the same command with --resume continues it",
                  file=sys.stderr)
        raise
    report = convert(model, config)
    seconds = time.perf_counter() - start
    qat = {"steps": settings.steps, "lr": settings.lr, "scale_lr": settings.scale_lr, "loss": settings.loss,
           "init": args.init, "train_window": args.train_window, "windows": len(windows), "seconds": seconds,
           "first_loss": losses[0], "last_loss": losses[-1]}
    label = f"{config.label} qat"
    save_quantized(model, tokenizer, info, report, config, args.output, keep_dtype=keep, extra={"qat": qat},
                   label=label)
    shutil.rmtree(checkpoint, ignore_errors=True)
    con.print(f"{label}: {len(report.layers)} layers, {report.bits_per_weight:.3f} bits/weight; {settings.steps} "
              f"steps in {seconds / 60:.1f} min, loss {losses[0]:.4f} -> {losses[-1]:.4f}; wrote {args.output} "
              f"(score it: lowbit eval {args.output})")
    return 0

