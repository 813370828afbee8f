"""The training loop of ``lowbit qat``: distillation (or next-token cross-entropy) on calibration windows, with
checkpoints an interrupted run resumes from, and a stop with the last good checkpoint kept when the loss diverges.

A checkpoint is a directory written atomically (``lowbit.files.atomic``): ``state.safetensors`` (every trained
parameter, the quantizers' fixed parts and the Adam moments; no pickle) and ``state.json`` (the step, the losses
so far, and what the run was started with, which a resumed run must match; the learning rates may differ, so a
run that diverged can go on with lower ones). The first is written before step 1: the start (GPTQ's, minutes
of work) survives an interruption from then on. Step ``i`` trains on window ``i mod n``, so a resumed run sees
the windows an uninterrupted one would.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import InputError, LowbitError
from ..files.atomic import atomic_dir, chmod_as_new
from ..progress import note, progress_bar

LOSSES = ("kl", "ce")
STATE_TENSORS, STATE_JSON = "state.safetensors", "state.json"


@dataclass(frozen=True)
class QATSettings:
    """``lr``: the weights' Adam step; ``scale_lr``: the quantizers' (steps and offsets). ``loss``: ``kl`` to the
    original model's next-token distribution (distillation) or ``ce`` on the text's next tokens."""

    steps: int
    lr: float
    scale_lr: float
    loss: str = "kl"
    checkpoint_every: int = 25

    def __post_init__(self):
        if self.steps < 1:
            raise InputError(f"--steps needs at least 1 step, got {self.steps}")
        for name in ("lr", "scale_lr"):
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise InputError(f"--{name.replace('_', '-')} is a positive number, got {value}")
        if self.loss not in LOSSES:
            raise InputError(f"--loss is one of {', '.join(LOSSES)}, got {self.loss!r}")
        if self.checkpoint_every < 1:
            raise InputError(f"checkpoint_every is at least 1, got {self.checkpoint_every}")


class DivergedError(LowbitError, ValueError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def trained_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def optimizer(model: nn.Module, settings: QATSettings) -> torch.optim.Adam:
    params = trained_parameters(model)
    scales = [p for name, p in params.items() if ".quantizer." in name]
    weights = [p for name, p in params.items() if ".quantizer." not in name]
    return torch.optim.Adam([{"params": weights, "lr": settings.lr}, {"params": scales, "lr": settings.scale_lr}])


def step_loss(student: nn.Module, teacher: nn.Module | None, window: torch.Tensor, loss: str) -> torch.Tensor:
    ids = window[None]
    logits = student(ids).logits[0].float()
    if loss == "ce":
        return F.cross_entropy(logits[:-1], window[1:])
    with torch.no_grad():
        target = teacher(ids).logits[0].float().log_softmax(-1)
    return F.kl_div(logits.log_softmax(-1), target, log_target=True, reduction="batchmean")


def train(student: nn.Module, teacher: nn.Module | None, windows: torch.Tensor, settings: QATSettings, *,
          checkpoint: Path | None = None, resume: bool = False, run: dict | None = None,
          progress: bool = True) -> list[float]:
    """Train ``student`` (``qat.prepare``'d) for ``settings.steps`` steps on ``windows`` ``(n, T)``; returns the
    loss of every step. ``checkpoint``: the directory written every ``checkpoint_every`` steps and at the end;
    ``resume``: continue from it (``run``, what identifies this run, must equal what it was started with)."""
    opt = optimizer(student, settings)
    run = {"settings": run_settings(settings)} | (run or {})
    losses: list[float] = []
    if resume:
        losses = load_checkpoint(checkpoint, student, opt, run)
    elif checkpoint is not None:
        save_checkpoint(checkpoint, student, opt, run, losses)  # the start, before any step
    student.train()
    if teacher is not None:
        teacher.eval()
    start, done = time.perf_counter(), len(losses)
    label = "training" if not done else f"training from step {done + 1}"
    with progress_bar(settings.steps - done, label, enabled=progress) as advance:
        for step in range(done, settings.steps):
            opt.zero_grad(set_to_none=True)
            loss = step_loss(student, teacher, windows[step % len(windows)], settings.loss)
            if not torch.isfinite(loss):
                good = f"the last good checkpoint (step {done})" if done else "the start"
                kept = f"{good} is kept in {checkpoint}: --resume it with a lower --lr" if checkpoint is not None \
                    else "lower --lr"
                raise DivergedError(f"the training loss became {loss.item()} at step {step + 1}; {kept}")
            loss.backward()
            opt.step()
            losses.append(loss.item())
            elapsed = time.perf_counter() - start
            advance(f"loss {sum(losses[-10:]) / len(losses[-10:]):.4f}, {elapsed / 60:.1f} min")
            if checkpoint is not None and ((step + 1) % settings.checkpoint_every == 0 or step + 1 == settings.steps):
                save_checkpoint(checkpoint, student, opt, run, losses)
                done = step + 1
                note(f"step {step + 1}/{settings.steps}: loss {losses[-1]:.4f} (mean of the last "
                     f"{min(10, len(losses))}: {sum(losses[-10:]) / len(losses[-10:]):.4f}), {elapsed / 60:.1f} min",
                     enabled=progress)
    student.eval()
    return losses


def run_settings(settings: QATSettings) -> dict:
    """What of ``settings`` a resumed run must repeat: all but the learning rates."""
    return {k: v for k, v in asdict(settings).items() if k not in ("lr", "scale_lr")}


def fixed_parts(model: nn.Module) -> dict[str, torch.Tensor]:
    """The quantizers' untrained parts (a per-tensor scale, a codebook): a start sets them, and a resumed run,
    which does not compute the start again, takes them from the checkpoint."""
    return {name: b for name, b in model.named_buffers() if ".quantizer." in name}


def save_checkpoint(directory: Path, model: nn.Module, opt: torch.optim.Adam, run: dict, losses: list[float]) -> None:
    params = trained_parameters(model)
    tensors = {f"param.{n}": p.detach().contiguous() for n, p in params.items()}
    tensors |= {f"fixed.{n}": b.detach().contiguous() for n, b in fixed_parts(model).items()}
    steps = {}
    for n, p in params.items():
        state = opt.state.get(p, {})
        if state:
            tensors[f"adam.{n}.exp_avg"] = state["exp_avg"].contiguous()
            tensors[f"adam.{n}.exp_avg_sq"] = state["exp_avg_sq"].contiguous()
            steps[n] = float(state["step"])
    meta = {"run": run, "step": len(losses), "losses": losses, "adam_steps": steps}
    with atomic_dir(directory, overwrite=True, replaceable=_only_a_checkpoint) as tmp:
        save_file(tensors, tmp / STATE_TENSORS)
        chmod_as_new(tmp / STATE_TENSORS)  # safetensors writes 0600; keep the umask's permissions
        (tmp / STATE_JSON).write_text(json.dumps(meta) + "\n")


def _only_a_checkpoint(path: Path) -> bool:
    """A checkpoint directory may be replaced only while it holds nothing but what ``save_checkpoint`` writes
    (a user's file put there survives: the run stops with a one-line error instead)."""
    return (path / STATE_JSON).is_file() and {p.name for p in path.iterdir()} <= {STATE_TENSORS, STATE_JSON}


def load_checkpoint(directory: Path | None, model: nn.Module, opt: torch.optim.Adam, run: dict) -> list[float]:
    """The losses so far; the model's trained parameters and the optimizer's moments set from the checkpoint."""
    if directory is None or not (Path(directory) / STATE_JSON).is_file():
        raise InputError(f"--resume: no checkpoint at {directory} (a run writes one every few steps)")
    meta = json.loads((Path(directory) / STATE_JSON).read_text())
    if meta.get("run") != json.loads(json.dumps(run)):
        raise InputError(f"--resume: the checkpoint at {directory} belongs to another run "
                         f"({meta.get('run')}); start again without --resume, or with the same settings")
    tensors = load_file(Path(directory) / STATE_TENSORS)
    params = trained_parameters(model)
    missing = [n for n in params if f"param.{n}" not in tensors]
    if missing:
        raise InputError(f"--resume: the checkpoint at {directory} lacks {missing[0]}")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"param.{n}"])
        for n, b in fixed_parts(model).items():
            if f"fixed.{n}" in tensors:  # a checkpoint written before they were saved has none
                b.copy_(tensors[f"fixed.{n}"])
    for n, p in params.items():
        if n in meta["adam_steps"]:
            opt.state[p] = {"step": torch.tensor(meta["adam_steps"][n]),
                            "exp_avg": tensors[f"adam.{n}.exp_avg"], "exp_avg_sq": tensors[f"adam.{n}.exp_avg_sq"]}
    return list(meta["losses"])
