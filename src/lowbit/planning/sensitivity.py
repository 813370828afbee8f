"""Per-layer sensitivity: what quantizing one layer alone costs in mean KL, for each candidate format.

**Measured.** The model with only that layer quantized runs on calibration windows (never the scored ones) and its
next-token distributions are compared with the original's: KL(p_original || p_quantized) at every position, mean
over tokens. The blocks before the layer's own are not rerun: their outputs on the calibration windows are caught
once and replayed, so one measurement costs the forward from the layer's block on.

**Predicted** (the cheap proxy). A layer's output error on the calibration inputs,
``E = mean over tokens of |(W_q - W) x|^2 = tr(dW H dW^T) / 2`` with ``H = 2/n X^T X`` (GPTQ's Hessian), scaled by
that layer's measured KL per unit of error for one anchor format: ``dKL(l, f) ~ dKL(l, anchor) E(l, f) /
E(l, anchor)``. KL is quadratic in a small logit change and E quadratic in the weight change, so the ratio is the
layer's own constant (how much its output error reaches the logits); the proxy spares measuring every candidate.
``tests/nn/test_sensitivity.py`` checks that it ranks layers as the measured KL does (Spearman >= 0.8 on the
embedded model).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration.blockwise import call, hessians, transformer_blocks
from ..errors import InputError, LayerQuantizeError, LowbitError
from ..files.atomic import write_json
from ..json_file import load_json
from ..layers.surgery import layout_error, linears, rounded_layer
from ..methods.gptq_model import effective_weight, gptq_layer
from ..pipeline import needs_calibration
from ..progress import progress_bar
from .config import QuantConfig
from .plan import DEFAULT_EXCLUDE, selected

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
                        exclude: tuple[str, ...] = DEFAULT_EXCLUDE, progress: bool = True) -> Sensitivity:
    """Each selected layer's cost per candidate on the calibration ``batches`` (input-id tensors of a causal LM).

    ``measure="anchor"`` measures each layer's KL for one candidate (``anchor``; default the lower median of the
    candidates' bits per weight) and predicts the others from the output error; ``"all"`` measures every one.
    ``include``/``exclude``: which layers, as ``QuantPlan.uniform``'s patterns. ``model`` is left as it was.
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
    runner = _Runner(model, batches)
    costs: dict[str, dict[str, LayerCost]] = {}
    anchor_bits = None
    try:
        with progress_bar(len(targets), f"sensitivity of {len(targets)} layers", enabled=progress) as advance:
            for index, names in runner.groups(targets):
                found = runner.hessians({n: targets[n] for n in names}, index)
                for name in names:
                    weight = targets[name].weight
                    layer, quantized = _layer_costs(name, targets[name], found.pop(name), configs)
                    anchor = anchor or _lower_median(layer)
                    if anchor_bits is None and anchor in layer:
                        anchor_bits = 8 * layer[anchor].bytes / weight.numel()
                    base = _layer_anchor(layer, anchor, weight.numel(), anchor_bits or 0.0)
                    kl = {label: runner.kl_with(weight, quantized[label], index)
                          for label in (layer if measure == "all" else [base])}
                    costs[name] = {label: LayerCost(c.bytes, c.error, kl[label], True) if label in kl else
                                   LayerCost(c.bytes, c.error, kl[base] * _ratio(c.error, layer[base].error), False)
                                   for label, c in layer.items()}
                    advance()
    finally:
        runner.close()
    return Sensitivity(tuple(configs), anchor, len(batches), {n: targets[n].weight.numel() for n in costs}, costs,
                       time.perf_counter() - start)


def _ratio(error: float, anchor_error: float) -> float:
    """How many times the anchor's output error a candidate's is (1 where the anchor's is 0: exact either way)."""
    return error / anchor_error if anchor_error > 0 else 1.0


def candidate(label: str | QuantConfig) -> QuantConfig:
    """A per-layer candidate's config; ``+awq`` is refused: its fold changes the norm a group of layers shares."""
    config = label if isinstance(label, QuantConfig) else QuantConfig.parse(label)
    if config.awq:
        raise InputError(f"{config.label}: +awq scales whole groups of layers through the op before them, so it "
                         "cannot be one layer's candidate; leave it out of the candidates")
    if config.outlier_threshold is not None:
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
            if config.method:
                q = gptq_layer(name, linear.weight, hessian, config).qweight
            else:  # @amse's importance: the calibration mean of x^2, H's diagonal / 2 (+had with it needs +gptq)
                importance = (hessian.diagonal() / 2).float() if needs_calibration(config.search) else None
                q, _ = rounded_layer(name, linear.weight, config, importance)
        except LayerQuantizeError:
            raise
        except LowbitError as e:
            raise LayerQuantizeError(f"layer {name!r} ({label}): {e}") from e
        # the error in the input's own basis: a rotation is orthogonal, so it is the rotated basis' error too
        deq = effective_weight(name, q, config).view(linear.weight.shape)
        delta = (deq - linear.weight.detach().float()).double()
        error = float(((delta @ hessian.double()) * delta).sum()) / 2
        dequantized[label] = deq
        out[label] = LayerCost(q.nbytes + (linear.in_features if config.rotate else 0), max(error, 0.0), math.nan,
                               False)
    if not out:
        raise LayerQuantizeError(f"layer {name!r} (weight {tuple(linear.weight.shape)}): no candidate can hold it")
    return out, dequantized


class _Runner:
    """The model on the calibration batches: blocks' inputs and outputs caught once, reference log-probs kept."""

    def __init__(self, model: nn.Module, batches: Sequence):
        self.model, self.batches = model, list(batches)
        self.blocks = transformer_blocks(model)
        self.inputs: list[list] = [[] for _ in self.blocks]
        self.outputs: list[list] = [[] for _ in self.blocks]
        self.reference: list[torch.Tensor] = []
        handles = []
        for i, block in enumerate(self.blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, a, k, i=i: self.inputs[i].append((a, k)), with_kwargs=True))
            handles.append(block.register_forward_hook(lambda m, a, out, i=i: self.outputs[i].append(out)))
        try:
            with torch.inference_mode():
                for batch in self.batches:
                    self.reference.append(self._logprobs(call(model, batch)))
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _logprobs(out) -> torch.Tensor:
        logits = getattr(out, "logits", None)
        if logits is None:
            raise InputError("sensitivity compares next-token distributions: it needs a causal LM (a model whose "
                             "output has logits)")
        return logits.float().log_softmax(-1)

    def groups(self, targets: dict[str, nn.Linear]) -> list[tuple[int | None, list[str]]]:
        """``(block index, layer names)`` in model order; layers outside the blocks come last, index None."""
        where = {}
        for i, block in enumerate(self.blocks):
            for m in block.modules():
                where.setdefault(id(m), i)
        out: dict[int | None, list[str]] = {}
        for name, linear in targets.items():
            out.setdefault(where.get(id(linear)), []).append(name)
        return sorted(out.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))

    def hessians(self, linears: dict[str, nn.Linear], index: int | None) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            if index is None:
                return hessians(linears, lambda: [call(self.model, b) for b in self.batches])
            block = self.blocks[index]
            return hessians(linears, lambda: [block(*a, **k) for a, k in self.inputs[index]])

    def kl_with(self, weight: nn.Parameter, replacement: torch.Tensor, index: int | None) -> float:
        """Mean KL over the batches' tokens with ``weight`` replaced; blocks before ``index`` replayed."""
        saved, weight.data = weight.data, replacement.to(weight.dtype)
        replays = [] if index is None else list(range(index))
        originals = {i: self.blocks[i] for i in replays}
        state = {"batch": 0}
        try:
            for i in replays:
                self.blocks[i] = _Replay(self.outputs[i], state)
            total, count = 0.0, 0
            with torch.inference_mode():
                for b, batch in enumerate(self.batches):
                    state["batch"] = b
                    lq = self._logprobs(call(self.model, batch))
                    lp = self.reference[b]
                    kl = (lp.exp() * (lp - lq)).sum(-1)
                    total += float(kl.double().sum())
                    count += kl.numel()
            return total / count
        finally:
            for i, block in originals.items():
                self.blocks[i] = block
            weight.data = saved

    def close(self) -> None:
        self.inputs = self.outputs = self.reference = []


class _Replay(nn.Module):
    """Stands in for a block: returns what the block returned on the current batch, computing nothing."""

    def __init__(self, outputs: list, state: dict):
        super().__init__()
        self._outputs, self._state = outputs, state

    def forward(self, *args, **kwargs):
        return self._outputs[self._state["batch"]]
