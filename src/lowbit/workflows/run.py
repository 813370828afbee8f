"""One way through for every plan: the methods its labels name, fed by calibration, then the layers swapped.

``run(model, plan, calibration)`` is what ``lowbit quantize``, ``lowbit compare`` (once per row, on a copy of the
model), ``--budget`` and the benchmarks call, so a label means the same bytes everywhere. Its steps, in order:
the methods that need calibration, in one block-by-block pass of the calibration engine
(``methods.calibrated.calibrate_methods``: AWQ's scales folded into the model first, so that the importance and
GPTQ's Hessians are the scaled inputs'; the importance of the layers an activation-weighted search rounds on its
own; GPTQ's weights), then ``quantize_model``.

A calibrated plan on a model read block by block (``streamed``) can be continued from the end of any block: it
hands over a ``Boundary`` after each, and takes one back as ``resumed`` (``lowbit quantize --resume``).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration.importance import DEFAULT_CALIBRATE, calibration_batches, collect_importance
from ..cluster.pool import SERIAL, Pool
from ..errors import InputError
from ..eval.protocol import DEFAULT_TEXT, DEFAULT_WINDOW
from ..layers.surgery import QuantizeReport, Sink, plan_layers, quantize_model
from ..methods.calibrated import Calibrated, calibrate_methods, leads
from ..methods.gptq_model import GPTQ_CALIBRATE
from ..methods.registry import BLOCK
from ..models.loader import CAUSAL_LM
from ..planning.plan import QuantPlan

if TYPE_CHECKING:
    from ..files.partial import ProducerState
    from ..models.lazy import LazyWeights


@dataclass
class Calibration:
    """Where calibration inputs come from: the evaluation text's windows (causal LM) or paragraphs (encoder) after
    the ``scored`` ones (``lowbit.calibration.importance``). ``count``: windows asked for (``--calibrate``); None:
    each use's default (``DEFAULT_CALIBRATE`` for the importance, ``GPTQ_CALIBRATE`` for GPTQ and AWQ).

    Inputs are built on first use and kept; so is the importance of the unchanged model, which every plan without
    ``+awq`` shares (``compare`` collects it once for all its rows)."""

    tokenizer: object
    kind: str
    text: str | None = None
    window: int = DEFAULT_WINDOW
    scored: int = 0
    count: int | None = None
    progress: bool = True
    _batches: dict = field(default_factory=dict, repr=False)
    _importance: dict = field(default_factory=dict, repr=False)
    seconds: float = 0.0  # spent collecting the shared importance

    def batches(self, default: int) -> tuple[list, str]:
        """``(forward inputs, what they are)`` of ``count`` (else ``default``) calibration windows."""
        count = self.count or default
        if count not in self._batches:
            self._batches[count] = calibration_batches(self.tokenizer, self.kind, self.text, window=self.window,
                                                       scored=self.scored, count=count)
        return self._batches[count]

    def importance(self, model: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
        """Mean squared input activation per channel of ``layers`` in ``model`` as it is now."""
        batches, label = self.batches(DEFAULT_CALIBRATE)
        return collect_importance(model, batches, layers=layers, progress=self.progress, label=label)

    def shared_importance(self, model: nn.Module, layers: list[str]) -> dict[str, torch.Tensor]:
        """``importance`` of the unchanged original ``model``, collected once for every layer any caller asks for
        (the first call must name them all: ``compare`` passes the union over its plans)."""
        missing = [n for n in layers if n not in self._importance]
        if missing:
            start = time.perf_counter()
            self._importance.update(self.importance(model, missing))
            self.seconds += time.perf_counter() - start
        return {n: self._importance[n] for n in layers}

    def settings(self, plan: QuantPlan) -> dict:
        """What decides ``plan``'s calibration inputs, by the names a user knows them by (a resumed run must have
        all of them as the run it continues): the windows asked for, the text, the window, the tokens read (after
        the scored ones), the inputs' own sha256 (the text's bytes and the tokenizer decide them too), and the
        transformers that runs the model on them."""
        import transformers

        importance = any(c.needs_importance for c in plan.configs)
        count = max(([self.count or GPTQ_CALIBRATE] if walks_blocks(plan) else []) +
                    ([self.count or DEFAULT_CALIBRATE] if importance else []))
        tokens = f"{self.scored * self.window}-{(self.scored + count) * self.window - 1}" if self.kind == CAUSAL_LM \
            else f"{count} x {self.window} in the paragraphs after the {self.scored} scored"
        digest = hashlib.sha256()
        for batches in _batches(plan, self, importance):
            for batch in batches or ():
                for t in (batch[k] for k in sorted(batch)) if isinstance(batch, Mapping) else (batch,):
                    digest.update(t.numpy().tobytes())
        return {"--calibrate": "the default" if self.count is None else self.count,
                "--text": DEFAULT_TEXT if self.text is None else os.path.abspath(self.text), "--window": self.window,
                "the calibration tokens": tokens, "the calibration inputs' sha256": digest.hexdigest(),
                "transformers": transformers.__version__}


@dataclass(frozen=True)
class Boundary:
    """Where a calibrated plan read block by block (``streamed``) stands at a block's end: the calibration pass's
    state there (``lowbit.calibration.engine.serve``), the reports of the layers rounded so far (one per block
    holding any, in order), and the seconds spent so far (the runs it continues included)."""

    state: ProducerState
    parts: tuple[QuantizeReport, ...]
    seconds: float


def importance_layers(model: nn.Module, plan: QuantPlan) -> list[str]:
    """The layers whose config rounds them on their own with an activation-weighted search, each by its first
    name (as ``named_modules()`` gives it): only these are calibrated, so an excluded lm_head is never computed."""
    return list(dict.fromkeys(names[0] for names, _, config, _ in plan_layers(model, plan) if config.needs_importance))


def changes_model(plan: QuantPlan) -> bool:
    """Whether a method of the plan changes the model before its layers are rounded (``+awq`` folds its scales:
    it needs each block's inputs), so the unchanged model's importance is not the one its layers see."""
    return any(m.needs == BLOCK for c in plan.configs for m in c.method_classes)


def walks_blocks(plan: QuantPlan) -> bool:
    """Whether the plan's methods need the block-by-block pass on ``GPTQ_CALIBRATE`` windows."""
    return changes_model(plan) or any(c.prequantized for c in plan.configs)


def run(model: nn.Module, plan: QuantPlan, calibration: Calibration | None = None, *, progress: bool = True,
        shared: bool = False, source: LazyWeights | None = None, sink: Sink | None = None,
        resumed: Boundary | None = None, at_boundary: Callable[[Boundary], None] | None = None,
        pool: Pool = SERIAL) -> QuantizeReport:
    """Quantize ``model`` in place as ``plan`` says, every method its labels name run first; the report's
    ``seconds`` include the calibration. ``shared``: ``model`` is an unchanged copy of the original the
    calibration's shared importance was collected on (``compare``), so a plan without ``+awq`` reuses it.

    ``source``: ``model`` was built on the meta device (``lowbit.models.lazy.load_lazily``). Without
    calibration, each layer's weight is read as it is rounded; with it, the pass reads one block at a time and
    each block's layers are rounded once the methods are done with it (``streamed``). ``sink``: each quantized
    layer is handed over instead of swapped in (``quantize_model``); a calibrated plan read block by block needs
    one (else the model is read whole first). ``resumed`` and ``at_boundary``: that block-by-block run continued
    from a block's end (``streamed``); a plan run otherwise is not, and never calls ``at_boundary``. ``pool``: where
    the layers are rounded, and one block's layers worked on (``lowbit.cluster.pool``)."""
    configs = plan.configs
    if calibration is None and plan.needs_calibration:
        raise InputError(f"{plan.label} needs calibration inputs: pass a Calibration")
    if source is not None and not plan.needs_calibration:
        if sink is None:
            source.onload(model, skip=[f"{n}.weight" for names, _, _, _ in plan_layers(model, plan) for n in names])
        return quantize_model(model, plan, progress=progress, source=source, sink=sink, pool=pool)
    if source is not None and sink is not None and streams(model, plan, calibration):
        return streamed(model, plan, calibration, source, sink, progress=progress, resumed=resumed,
                        at_boundary=at_boundary, pool=pool)
    if resumed is not None:
        raise InputError(f"{plan.label} is not run block by block here: it cannot be continued from a block's end")
    if source is not None:
        source.onload(model)
        source = None
    seconds, importance, prequantized = 0.0, None, None
    layers = importance_layers(model, plan) if any(c.needs_importance for c in configs) else []
    if layers and shared and not changes_model(plan):  # the unchanged model's importance, collected once
        importance, layers = calibration.shared_importance(model, layers), []
        seconds += calibration.seconds
    if walks_blocks(plan):
        batches, _ = calibration.batches(GPTQ_CALIBRATE)  # a text too short for GPTQ fails before any calibration
        start = time.perf_counter()
        found = calibrate_methods(model, plan, batches, importance_layers=layers, progress=progress,
                                  importance_batches=calibration.batches(DEFAULT_CALIBRATE)[0] if layers else None,
                                  pool=pool)
        seconds += time.perf_counter() - start
        importance = found.importance if layers else importance
        prequantized = found.prequantized or None
    elif layers:
        start = time.perf_counter()
        importance = calibration.importance(model, layers)
        seconds += time.perf_counter() - start
    report = quantize_model(model, plan, progress=progress, importance=importance, prequantized=prequantized,
                            sink=sink, pool=pool)
    return replace(report, seconds=report.seconds + seconds)


def _batches(plan: QuantPlan, calibration: Calibration, importance: bool) -> tuple[list, list | None]:
    """``(the pass's inputs, the importance's)``: GPTQ's windows where a method walks the blocks, else the
    importance's; the importance's None where the plan rounds no layer with it."""
    own = calibration.batches(DEFAULT_CALIBRATE)[0] if importance else None
    return (calibration.batches(GPTQ_CALIBRATE)[0] if walks_blocks(plan) else own), own


def streams(model: nn.Module, plan: QuantPlan, calibration: Calibration) -> bool:
    """Whether ``plan``'s calibration of ``model`` can be run block by block (``streamed``): the importance, if
    any, is served in the pass (an encoder's importance paragraphs are not the first of GPTQ's)."""
    importance = any(c.needs_importance for c in plan.configs)
    batches, own = _batches(plan, calibration, importance)
    return own is None or leads(own, batches)


def streamed(model: nn.Module, plan: QuantPlan, calibration: Calibration, source: LazyWeights, sink: Sink, *,
             progress: bool = True, resumed: Boundary | None = None,
             at_boundary: Callable[[Boundary], None] | None = None, pool: Pool = SERIAL) -> QuantizeReport:
    """``run`` of a calibrated plan on a model read block by block: one pass of the calibration engine reads each
    block, serves the methods, rounds the block's layers with what they found and hands them to ``sink``, then
    frees the block's weights; the layers outside the blocks last. The same calibration, so the same layers, as
    ``run`` on the model read whole (tests/workflows/test_streamed_run.py).

    ``at_boundary``: called after each block's layers are handed over, with where the run stands
    (``Boundary``); ``resumed``: such a boundary, which the run goes on from (the layers of the blocks before it
    neither read nor rounded again: the report counts them from ``resumed.parts``)."""
    start = time.perf_counter()
    before = 0.0 if resumed is None else resumed.seconds
    layers = importance_layers(model, plan) if any(c.needs_importance for c in plan.configs) else []
    batches, own = _batches(plan, calibration, bool(layers))
    parts = [] if resumed is None else list(resumed.parts)

    def on_block(names: list[str], found: Calibrated) -> None:
        if names:
            parts.append(quantize_model(model, plan, progress=False, importance=found.importance,
                                        prequantized=found.prequantized, source=source, sink=sink, only=names,
                                        pool=pool))

    def boundary(state: ProducerState) -> None:
        at_boundary(Boundary(state, tuple(parts), before + time.perf_counter() - start))

    found = calibrate_methods(model, plan, batches, importance_layers=layers, importance_batches=own,
                              progress=progress, weights=source, on_block=on_block,
                              at_boundary=None if at_boundary is None else boundary,
                              resumed=None if resumed is None else resumed.state, pool=pool)
    done = {n for p in parts for n in p.layers}
    rest = [names[0] for names, _, _, _ in plan_layers(model, plan) if names[0] not in done]
    if rest or not parts:
        parts.append(quantize_model(model, plan, progress=False, importance=found.importance,
                                    prequantized=found.prequantized, source=source, sink=sink, only=rest,
                                    pool=pool))
    return replace(QuantizeReport.combine(parts), seconds=before + time.perf_counter() - start)
