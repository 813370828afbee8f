"""Per-layer sensitivity: what quantizing one layer alone costs in mean KL, for each candidate format.

**Measured.** The model with only that layer quantized runs on calibration windows (never the scored ones) and its
next-token distributions are compared with the original's: KL(p_original || p_quantized) at every position, mean
over tokens. The blocks before the layer's own are not rerun: the model is walked block by block
(``lowbit.calibration.engine``), and at each block every measurement of its layers starts from the inputs the walk
reached: the block run with the layer's weight replaced, then each later block on those outputs, then what follows
the blocks (final norm, head) as the model's own forward with every block replaying the last one's outputs
(``BlockPass.replaying``). The reference log-probabilities come from one such walk of the unchanged model first.
A block computes the floats it computes inside a full forward (tests/calibration/test_engine.py), so a KL is the
one full forwards give, to the bit (tests/planning/test_sensitivity.py).

The later blocks are run for all of one block's measurements together, each brought into memory once for them
(``lowbit.eval.blockwise``): a model built on the meta device (``lowbit.models.lazy.load_lazily``) is so read
from its checkpoint one block at a time, and memory holds one block, the inputs of every measurement of one block
(``measurements x batches x tokens x hidden`` floats), the reference log-probabilities and what lies outside the
blocks (embedding, final norm, head). On a Ray cluster (``lowbit.cluster.pool``) each measurement is a task
instead (``lowbit.planning.sensitivity_cells``), run on a worker that reads the model from the same files, while
this process walks on to the next block's Hessians and candidates: the same table, to the bit
(tests/cluster/test_sensitivity_ray.py).

**Predicted** (the cheap proxy). A layer's output error on the calibration inputs,
``E = mean over tokens of |(W_q - W) x|^2 = tr(dW H dW^T) / 2`` with ``H = 2/n X^T X`` (GPTQ's Hessian), scaled by
that layer's measured KL per unit of error for one anchor format: ``dKL(l, f) ~ dKL(l, anchor) E(l, f) /
E(l, anchor)``. KL is quadratic in a small logit change and E quadratic in the weight change, so the ratio is the
layer's own constant (how much its output error reaches the logits); the proxy spares measuring every candidate.
``tests/planning/test_sensitivity.py`` checks that it ranks layers as the measured KL does (Spearman >= 0.8 on the
embedded model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..calibration.engine import Block, BlockPass, Stream, transformer_blocks
from ..calibration.statistics import HESSIAN
from ..cluster.pool import SERIAL, Pool
from ..errors import InputError, LayerQuantizeError, LowbitError
from ..eval.blockwise import Onloaded, Resident, block_names, through_blocks
from ..files.atomic import write_json
from ..json_file import load_json
from ..layers.surgery import layout_error, linears
from ..methods.calibrated import layer_from_hessian
from ..methods.gptq_model import effective_weight
from ..methods.registry import BLOCK
from ..progress import progress_bar
from .config import QuantConfig
from .plan import DEFAULT_EXCLUDE, selected
from .sensitivity_cells import CellJob, cell, mean_kl, replaced, tail_logprobs

if TYPE_CHECKING:
    from ..models.lazy import LazyWeights

# Calibration windows of 512 tokens each measurement runs: 1,024 tokens. A measurement costs the forward from
# the layer's block on plus the full-vocabulary log-softmax (~1 s a window for SmolLM2 on 2 CPU threads), and
# every layer is measured once for the anchor: 210 layers x 2 windows fits item 6's 15 minutes for 6 candidates.
SENSITIVITY_CALIBRATE = 2
DEFAULT_CANDIDATES = ("int3", "int4", "nf4", "int5", "int6", "int8")
MEASURES = ("anchor", "all")


@dataclass(frozen=True)
class LayerCost:
    """One (layer, candidate): ``bytes`` stored, output ``error`` E, ``kl`` (measured or predicted)."""

    bytes: int
    error: float
    kl: float
    measured: bool


@dataclass
class Sensitivity:
    """Every selected layer's cost per candidate label; a label missing from a layer's costs cannot hold its shape."""

    candidates: tuple[str, ...]
    anchor: str
    windows: int
    numel: dict[str, int]  # layer -> weights
    costs: dict[str, dict[str, LayerCost]]
    seconds: float = 0.0
    model: dict = field(default_factory=dict)  # ModelInfo fields of the model measured, when known

    def bits(self, layer: str, label: str) -> float:
        return 8 * self.costs[layer][label].bytes / self.numel[layer]

    def to_dict(self) -> dict:
        return {"candidates": list(self.candidates), "anchor": self.anchor, "windows": self.windows,
                "seconds": self.seconds, "model": self.model,
                "layers": [{"name": n, "numel": self.numel[n],
                            "costs": {label: vars(c) for label, c in self.costs[n].items()}} for n in self.numel]}

    @classmethod
    def from_dict(cls, d: dict) -> Sensitivity:
        try:
            layers = d["layers"]
            return cls(tuple(d["candidates"]), d["anchor"], int(d["windows"]),
                       {x["name"]: int(x["numel"]) for x in layers},
                       {x["name"]: {label: LayerCost(int(c["bytes"]), float(c["error"]), float(c["kl"]),
                                                     bool(c["measured"])) for label, c in x["costs"].items()}
                        for x in layers}, float(d.get("seconds", 0.0)), dict(d.get("model", {})))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a lowbit sensitivity table ({type(e).__name__}: {e})") from None

    def save(self, path) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path) -> Sensitivity:
        return load_json(path, "sensitivity table", cls.from_dict)


def measure_sensitivity(model: nn.Module, candidates: Sequence[str | QuantConfig], batches: Sequence, *,
                        measure: str = "anchor", anchor: str | None = None, include: tuple[str, ...] = (),
                        exclude: tuple[str, ...] = DEFAULT_EXCLUDE, weights: LazyWeights | None = None,
                        progress: bool = True, pool: Pool = SERIAL, spec: str | None = None,
                        file_hash: str | None = None) -> Sensitivity:
    """Each selected layer's cost per candidate on the calibration ``batches`` (input-id tensors of a causal LM).

    ``measure="anchor"`` measures each layer's KL for one candidate (``anchor``; default the lower median of the
    candidates' bits per weight) and predicts the others from the output error; ``"all"`` measures every one.
    ``include``/``exclude``: which layers, as ``QuantPlan.uniform``'s patterns. ``weights``: ``model`` was built on
    the meta device (``lowbit.models.lazy.load_lazily``) and is read from them one block at a time; the table is
    the one of the model in memory. ``model`` is left as it was. ``pool``: a Ray pool (``lowbit.cluster.pool``)
    measures each (layer, candidate) as a task, the model loaded there again from ``spec`` (``load_lazily``'s;
    None: the embedded model), whose files must hash to ``file_hash`` (the ``ModelInfo``'s of ``model``); the
    same table.
    """
    if measure not in MEASURES:
        raise InputError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
    configs = _configs(candidates)
    if not batches:
        raise InputError("no calibration inputs given")
    start = time.perf_counter()
    targets = {names[0]: linear for names, linear in linears(model) if selected(names, include, exclude)}
    if not targets:
        raise InputError(f"no nn.Linear layer left to measure (include={list(include)}, exclude={list(exclude)})")
    if anchor is not None:
        anchor = QuantConfig.parse(anchor).label  # "nf4/64" and "nf4" name one candidate
    if anchor is not None and anchor not in configs:
        raise InputError(f"anchor {anchor!r} is not one of the candidates ({', '.join(configs)})")
    job = _job(pool, weights, spec, file_hash, batches)
    measuring = _Measure(Resident(model) if weights is None else Onloaded(model, weights), targets, configs, measure,
                         anchor)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            measuring.walk(batches, progress=progress, pool=pool, job=job)
    finally:
        model.train(was_training)
    costs = measuring.costs  # in the order measured: block by block, the layers outside the blocks last
    return Sensitivity(tuple(configs), measuring.anchor, len(batches), {n: targets[n].weight.numel() for n in costs},
                       costs, time.perf_counter() - start)


def _job(pool: Pool, weights: LazyWeights | None, spec: str | None, file_hash: str | None,
         batches: Sequence) -> CellJob | None:
    """What a worker of a distributed ``pool`` needs to measure a cell; None for the serial pool."""
    if not pool.distributed:
        return None
    if weights is None:
        raise InputError("--ray needs the model as a safetensors directory (or a converted GGUF) readable on every "
                         "node: a model held in memory here cannot be sent to the workers")
    if file_hash is None:
        raise InputError("a distributed pool needs the model's file_hash: each worker checks it reads the same files")
    return CellJob.of(spec, file_hash, batches)


def _ratio(error: float, anchor_error: float) -> float:
    """How many times the anchor's output error a candidate's is (1 where the anchor's is 0: exact either way)."""
    return error / anchor_error if anchor_error > 0 else 1.0


def candidate(label: str | QuantConfig) -> QuantConfig:
    """A per-layer candidate's config; ``+awq`` is refused: its fold changes the norm a group of layers shares."""
    config = label if isinstance(label, QuantConfig) else QuantConfig.parse(label)
    changer = next((m for m in config.method_classes if m.needs == BLOCK), None)
    if changer is not None:
        raise InputError(f"{config.label}: {changer.suffix} changes the model around its layers (+awq scales whole "
                         "groups of layers through the op before them), so it cannot be one layer's candidate; leave "
                         "it out of the candidates")
    if any(m.rounds_activations for m in config.method_classes):
        raise InputError(f"{config.label}: LLM.int8() rounds the activations at run time, which a candidate's "
                         "sensitivity (its weights' error) does not measure; score it with lowbit compare instead")
    return config


def _configs(candidates) -> dict[str, QuantConfig]:
    configs = {}
    for c in candidates:
        config = candidate(c)
        configs[config.label] = config
    if not configs:
        raise InputError("no candidate format given")
    return configs


def _lower_median(layer: dict[str, LayerCost]) -> str:
    """The candidate whose stored bytes are the lower median of the first layer's candidates."""
    by_bytes = sorted(layer, key=lambda label: layer[label].bytes)
    return by_bytes[(len(by_bytes) - 1) // 2]


def _layer_anchor(layer: dict[str, LayerCost], anchor: str, numel: int, anchor_bits: float) -> str:
    """``anchor`` where the layer holds it, else the candidate nearest to it in bits per weight (a GGUF layout
    the layer's rows cannot hold leaves the others)."""
    if anchor in layer:
        return anchor
    return min(layer, key=lambda label: abs(8 * layer[label].bytes / numel - anchor_bits))


def _layer_costs(name: str, linear: nn.Linear, hessian: torch.Tensor,
                 configs: dict[str, QuantConfig]) -> tuple[dict[str, LayerCost], dict[str, torch.Tensor]]:
    """``(costs, dequantized weights)`` per candidate the layer's shape can hold (KL not yet known: NaN)."""
    out, dequantized = {}, {}
    for label, config in configs.items():
        if layout_error(name, linear, config) is not None:
            continue  # not a candidate for this layer; plan_for_budget picks among the others
        try:
            q = layer_from_hessian(name, linear.weight, hessian, config)
        except LayerQuantizeError:
            raise
        except LowbitError as e:
            raise LayerQuantizeError(f"layer {name!r} ({label}): {e}") from e
        # the error in the input's own basis: a rotation is orthogonal, so it is the rotated basis' error too
        deq = effective_weight(name, q, config).view(linear.weight.shape)
        delta = (deq - linear.weight.detach().float()).double()
        error = float(((delta @ hessian.double()) * delta).sum()) / 2
        dequantized[label] = deq
        signs = config.layer_signs(name, linear.in_features)
        out[label] = LayerCost(q.nbytes + (0 if signs is None else linear.in_features), max(error, 0.0), math.nan,
                               False)
    if not out:
        raise LayerQuantizeError(f"layer {name!r} (weight {tuple(linear.weight.shape)}): no candidate can hold it")
    return out, dequantized


class _Measure:
    """Sensitivity's walk of the unchanged model (module docstring), its blocks' weights brought into memory by
    ``run``: at each block, its selected layers' Hessians, each candidate's cost, and the KL of the model with one
    layer replaced; the layers outside the blocks last. ``costs``: layer -> label -> LayerCost."""

    def __init__(self, run: Resident, targets: dict[str, nn.Linear], configs: dict[str, QuantConfig], measure: str,
                 anchor: str | None):
        self.run, self.model = run, run.model
        self.targets, self.configs, self.measure, self.anchor = targets, configs, measure, anchor
        transformer_blocks(self.model)  # the blocks before a layer's are replayed: a model needs blocks
        self.blocks = block_names(self.model)
        self.names = {id(m): n for n, m in self.model.named_modules()}
        self.costs: dict[str, dict[str, LayerCost]] = {}
        self.reference: list[torch.Tensor] = []  # per batch, the unchanged model's log-probabilities
        self._anchor_bits = None

    def walk(self, batches: Sequence, *, progress: bool, pool: Pool = SERIAL, job: CellJob | None = None) -> None:
        """The table, each cell measured here, or as a task of a distributed ``pool`` (``job``: what its workers
        need)."""
        with self.run.outside(self.blocks):
            self.engine = BlockPass(self.model, batches)  # catches the first block's inputs
            where = self.engine.block_of(self.targets)
            outside = [n for n, i in where.items() if i is None]
            last = len(self.blocks) - 1 if outside else max(i for i in where.values() if i is not None)
            with progress_bar(len(self.blocks) + last + 1 + bool(outside), f"sensitivity of {len(self.targets)} "
                              "layers", enabled=progress) as advance:
                stream = self.engine.stream()
                through_blocks(self.run, self.engine, self.blocks, [stream], each=advance)
                tail_logprobs(self.model, self.engine, len(self.blocks), stream,
                              lambda b, lp: self.reference.append(lp))
                stream = self.engine.stream()
                if pool.distributed:
                    self._tasks(pool, job, last, outside, stream, advance)
                    return
                for i in range(last + 1):
                    self._block(i, stream)
                    advance()
                if outside:
                    self._outside(outside, stream)
                    advance()

    def _block(self, index: int, stream: Stream) -> None:
        """Block ``index``'s layers measured on ``stream`` (its inputs), which then moves on past it."""
        measured: dict[tuple[str, str], Stream] = {}  # (layer, label): the block's outputs with that weight replaced
        chosen = {}
        for block, layer, module, label, weight in self._cells(index, stream, chosen):
            with replaced(module.weight, weight):
                measured[layer, label] = Stream(stream.inputs)
                measured[layer, label].advance(block.run(stream))
        if measured:  # else no block need be brought in
            through_blocks(self.run, self.engine, self.blocks, list(measured.values()), start=index + 1)
        kl = {key: self._kl(measured.pop(key)) for key in list(measured)}
        for layer, (costs, base) in chosen.items():
            self._record(layer, costs, base, {label: kl[layer, label] for label in costs if (layer, label) in kl})

    def _cells(self, index: int, stream: Stream, chosen: dict) -> Iterator[tuple[Block, str, nn.Linear, str,
                                                                                  torch.Tensor]]:
        """``(block, layer, module, label, dequantized weight)`` for each cell of block ``index`` to measure, with
        the block in memory and ``stream`` at its inputs, one layer's candidates at a time; ``chosen[layer]``: its
        costs and base label (``_candidates``). ``stream`` then moves on past the block."""
        name = self.blocks[index]
        with self.run.block(name):
            block = Block(index, self.model.get_submodule(name), self.engine.masks, self.names)
            mine = block.layers(self.targets)
            hessians, outputs = block.statistics(stream, mine, [HESSIAN])
            for layer, module in mine.items():
                chosen[layer], quantized = self._candidates(layer, module, hessians[HESSIAN].pop(layer))
                for label, weight in quantized.items():
                    yield block, layer, module, label, weight
                del quantized  # one layer's candidates at a time
        stream.advance(outputs)

    def _outside(self, names: list[str], stream: Stream) -> None:
        """The layers outside the blocks, their Hessians from a forward replaying ``stream`` (through every block)."""
        chosen, kl = {}, {}
        for name, module, label, weight in self._outside_cells(names, stream, chosen):
            # every block rerun, on inputs caught anew: a head tied to the input embedding (SmolLM2) changes the
            # embedding too when its weight is replaced, as it always has here (0.000444 vs 0.000412 for int8 on
            # SmolLM2's lm_head, 2 windows of 64 tokens, had the blocks replayed an unchanged embedding's outputs)
            with replaced(module.weight, weight):
                fresh = BlockPass(self.model, self.engine.batches).stream()
                through_blocks(self.run, self.engine, self.blocks, [fresh])
                kl.setdefault(name, {})[label] = self._kl(fresh)
        for name, (costs, base) in chosen.items():
            self._record(name, costs, base, kl[name])

    def _outside_cells(self, names: list[str], stream: Stream, chosen: dict
                       ) -> Iterator[tuple[str, nn.Linear, str, torch.Tensor]]:
        """``(layer, module, label, dequantized weight)`` for each cell of the layers outside the blocks, as
        ``_cells``; their Hessians from a forward replaying ``stream`` (through every block)."""
        layers = {n: self.model.get_submodule(n) for n in names}
        hessians = self.engine.tail(layers, [HESSIAN], replay=stream)[HESSIAN]
        for name, module in layers.items():
            chosen[name], quantized = self._candidates(name, module, hessians.pop(name))
            for label, weight in quantized.items():
                yield name, module, label, weight
            del quantized

    def _tasks(self, pool: Pool, job: CellJob, last: int, outside: list[str], stream: Stream,
               advance: Callable[[], None]) -> None:
        """Blocks ``0..last`` and the ``outside`` layers measured with each cell a task of ``pool``
        (``sensitivity_cells.cell``), this process walking on to the next cells as the tasks run; the bar advances
        as each block's results are in."""
        chosen: dict[str, tuple[dict[str, LayerCost], str]] = {}
        steps: list[tuple[str, str, int]] = []  # per task: layer, label, block index (last + 1: outside)

        def units():
            for i in range(last + 1):
                for _, layer, _, label, weight in self._cells(i, stream, chosen):
                    steps.append((layer, label, i))
                    yield i, layer, weight, stream.inputs
            if outside:
                for layer, _, label, weight in self._outside_cells(outside, stream, chosen):
                    steps.append((layer, label, last + 1))
                    yield None, layer, weight, None

        kl: dict[str, dict[str, float]] = {}
        done = 0  # steps whose every result is in: those before the step of a result drawn
        for k, value in enumerate(pool.map(cell, units(), shared=(job, self.reference))):
            layer, label, step = steps[k]
            for _ in range(done, step):
                advance()
            done = step
            kl.setdefault(layer, {})[label] = value
        for _ in range(done, last + 1 + bool(outside)):
            advance()
        for layer, (costs, base) in chosen.items():
            self._record(layer, costs, base, kl[layer])

    def _candidates(self, name: str, module: nn.Linear, hessian: torch.Tensor
                    ) -> tuple[tuple[dict[str, LayerCost], str], dict[str, torch.Tensor]]:
        """``((costs, the label whose KL the others are predicted from), {label: dequantized weight})`` for the
        labels to measure."""
        numel = module.weight.numel()
        layer, quantized = _layer_costs(name, module, hessian, self.configs)
        self.anchor = self.anchor or _lower_median(layer)
        if self._anchor_bits is None and self.anchor in layer:
            self._anchor_bits = 8 * layer[self.anchor].bytes / numel
        base = _layer_anchor(layer, self.anchor, numel, self._anchor_bits or 0.0)
        return (layer, base), {label: quantized[label] for label in (layer if self.measure == "all" else [base])}

    def _record(self, name: str, layer: dict[str, LayerCost], base: str, kl: dict[str, float]) -> None:
        self.costs[name] = {label: LayerCost(c.bytes, c.error, kl[label], True) if label in kl else
                            LayerCost(c.bytes, c.error, kl[base] * _ratio(c.error, layer[base].error), False)
                            for label, c in layer.items()}

    def _kl(self, stream: Stream) -> float:
        """Mean KL over the batches' tokens of the model whose blocks reached ``stream``'s last outputs."""
        return mean_kl(self.model, self.engine, len(self.blocks), self.reference, stream)
