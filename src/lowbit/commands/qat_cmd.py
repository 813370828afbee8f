"""`lowbit qat`: quantization-aware training (LSQ) on the calibration split, saved like `lowbit quantize` output."""

from __future__ import annotations

import copy
import math
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .. import limits as L
from ..calibration.importance import calibration_batches, calibration_windows
from ..errors import InputError
from ..eval.protocol import DEFAULT_WINDOW, DEFAULT_WINDOWS, read_text
from ..files.outputs import check_outputs
from ..io.model_io import check_output, local_source, save_quantized
from ..layers.keep_dtype import parse_keep_dtype
from ..methods.gptq_model import GPTQ_CALIBRATE, gptq_weights
from ..methods.lsq import INITS
from ..methods.qat import check_qat_config, convert, prepare
from ..methods.qat_train import LOSSES, QATSettings, train
from ..methods.registry import ordered
from ..models.loader import CAUSAL_LM
from ..planning.plan import QuantPlan
from .common import add_keep_dtype_arg, add_model_arg, add_selection_args, console, load, parse_plans, source_dtype

# The default run: GPTQ's rounding as the start (5.8 minutes for SmolLM2 on 2 cores), then 250 steps of 256
# tokens (64,000 tokens, the text after the scored windows read ~0.6 times) at 4.5 s a step (the original's
# forward for the distillation target, the student's forward and backward through fake quantization, Adam):
# about 25 minutes in all, inside issue 12's 30 (README "Quantization-aware training").
DEFAULT_STEPS = 250
TRAIN_WINDOW = 256  # tokens per step: half the scored window, twice the steps in the same time
DEFAULT_LR, DEFAULT_SCALE_LR = 1e-5, 1e-4
INIT_CHOICES = (*INITS, "gptq")  # gptq: GPTQ's rounding as the start (gptq_start)
DEFAULT_INIT = "gptq"  # int4/64: 0.0660 KL from GPTQ's start against 0.1376 from @mse's (300 steps each)
MIN_TRAIN_WINDOWS = 4  # fewer windows after the scored ones is too little text to train on


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


def checkpoint_dir(output) -> Path:
    path = Path(output)
    return path.with_name(path.name + ".qat-checkpoint")


def gptq_start(model, tokenizer, plan, text: str | None, window: int, scored: int) -> dict:
    """GPTQ's rounding (``+gptq@amse``) of every layer the plan trains, on the windows after the scored ones."""
    gplan = QuantPlan(tuple(replace(r, config=None if r.config is None else
                                    replace(r.config, methods=ordered((*r.config.methods, "+gptq")), search="amse"),
                                    fallback=None)
                            for r in plan.rules), plan.name)
    batches, _ = calibration_batches(tokenizer, CAUSAL_LM, text, window=window, scored=scored, count=GPTQ_CALIBRATE)
    return {name: r.qweight for name, r in gptq_weights(model, gplan, batches).items()}


@dataclass(frozen=True)
class TrainingText:
    """The training windows: every whole ``train_window``-token window after the ``scored`` ones of ``window``
    (``skip`` training windows cover those)."""

    text: str | None
    name: str
    window: int
    scored: int
    train_window: int
    skip: int
    windows: torch.Tensor


def check_windows(window: int, scored: int, train_window: int) -> None:
    if train_window < 2 or window < 2 or scored < 0:
        raise InputError(f"need --train-window >= 2, --window >= 2 and --windows >= 0, got {train_window}, "
                         f"{window} and {scored}")


def training_text(tokenizer, text: str | None, *, window: int = DEFAULT_WINDOW, scored: int = DEFAULT_WINDOWS,
                  train_window: int = TRAIN_WINDOW) -> TrainingText:
    check_windows(window, scored, train_window)
    name, body = read_text(text)
    # the scored tokens are scored * window; training windows start at the first whole one after them
    skip = math.ceil(scored * window / train_window)
    windows = calibration_windows(tokenizer, body, name, window=train_window, scored=skip, count=None)
    if len(windows) < MIN_TRAIN_WINDOWS:
        raise InputError(f"text {name} holds {len(windows)} windows of {train_window} tokens after the {scored} "
                         f"scored ones; training needs at least {MIN_TRAIN_WINDOWS}: use a longer --text or fewer "
                         "--windows")
    return TrainingText(text, name, window, scored, train_window, skip, windows)


def train_quantized(model, tokenizer, model_hash: str | None, plan, settings: QATSettings, data: TrainingText, *,
                    init: str = "mse", checkpoint: Path | None = None, resume: bool = False) -> tuple:
    """Train ``model`` in place (fake quantization, then ``convert``): ``(QuantizeReport, the run's record)``."""
    teacher = copy.deepcopy(model) if settings.loss == "kl" else None
    start = time.perf_counter()
    if resume:  # the checkpoint holds the start and every value training changed: the quick rule gives the
        prepare(model, plan, init="rule")  # layers their shapes, and load_checkpoint overwrites all of it
    else:
        seeds = gptq_start(model, tokenizer, plan, data.text, data.window, data.scored) if init == "gptq" else None
        prepare(model, plan, init="mse" if seeds else init, start=seeds)
    run_id = {"model": model_hash, "config": plan.to_dict(), "init": init, "text": data.name,
              "train_window": data.train_window, "skip": data.skip}
    losses = train(model, teacher, data.windows, settings, checkpoint=checkpoint, resume=resume, run=run_id)
    report = convert(model, plan)
    seconds = time.perf_counter() - start
    report = replace(report, seconds=seconds)  # the run's cost: GPTQ, training and the conversion
    record = {"steps": settings.steps, "lr": settings.lr, "scale_lr": settings.scale_lr, "loss": settings.loss,
              "init": init, "train_window": data.train_window, "windows": len(data.windows),
              "seconds": seconds, "first_loss": losses[0], "last_loss": losses[-1]}
    return report, record


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
    model, tokenizer, info = load(args.model, con)
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
