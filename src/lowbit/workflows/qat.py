"""Quantization-aware training (LSQ) of a model as a plan says, on the text after the scored windows: what
`lowbit qat` runs and benchmarks/bench_quality.py's QAT rows call."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..calibration.importance import calibration_batches, calibration_windows
from ..errors import InputError
from ..eval.protocol import DEFAULT_WINDOW, DEFAULT_WINDOWS, read_text
from ..methods.calibrated import calibrate_methods
from ..methods.gptq_method import GPTQ
from ..methods.gptq_model import GPTQ_CALIBRATE
from ..methods.lsq import INITS
from ..methods.qat import convert, prepare
from ..methods.qat_train import QATSettings, train
from ..methods.registry import ordered
from ..models.loader import CAUSAL_LM
from ..planning.plan import QuantPlan

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


def checkpoint_dir(output) -> Path:
    path = Path(output)
    return path.with_name(path.name + ".qat-checkpoint")


def gptq_start(model, tokenizer, plan, text: str | None, window: int, scored: int) -> dict:
    """GPTQ's rounding (``+gptq@amse``) of every layer the plan trains, on the windows after the scored ones."""
    gplan = QuantPlan(tuple(replace(r, config=None if r.config is None else
                                    replace(r.config, methods=ordered((*r.config.methods, GPTQ.suffix)), search="amse"),
                                    fallback=None)
                            for r in plan.rules), plan.name)
    batches, _ = calibration_batches(tokenizer, CAUSAL_LM, text, window=window, scored=scored, count=GPTQ_CALIBRATE)
    return calibrate_methods(model, gplan, batches).prequantized


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
