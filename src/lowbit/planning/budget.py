"""Mixed precision under a bits budget: a format per layer minimizing the predicted total KL.

Each layer's candidates come from a sensitivity table (``lowbit.planning.sensitivity``): the bytes a candidate actually
stores for that layer (scales and per-tensor parts included) and its predicted KL when that layer alone is
quantized. Per-layer KL changes are taken to add up (HAWQ-V3, arXiv 2011.10680, and llama.cpp's mixes rest on the
same assumption), so the choice is a multiple-choice knapsack: minimize the sum of KL over the layers with the sum
of bytes at most ``budget * weights / 8``. It is solved exactly by dynamic programming over the bytes a plan stores
*beyond the smallest mix* (every layer at its smallest candidate), counted in units of ``slack / RESOLUTION``, each
candidate's extra bytes rounded *up* to whole units: the plan found never stores more than the budget, rounding costs
at most one unit per layer of slack, and the smallest mix itself (zero extra bytes) is always admissible, so a budget
of exactly the smallest mix is met. The budget is compared in whole bytes, from the decimal the user typed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np
import torch.nn as nn

from ..errors import InputError
from ..layers.surgery import linears
from ..limits import BUDGET
from .config import QuantConfig
from .plan import PlanRule, QuantPlan
from .sensitivity import DEFAULT_CANDIDATES, Sensitivity, measure_sensitivity

if TYPE_CHECKING:
    from ..models.lazy import LazyWeights

# Capacity units of the dynamic programme: 210 layers x 6 candidates x 100,000 units takes ~0.5 s in numpy, and
# the rounding leaves at most (layers / RESOLUTION) of the slack above the smallest mix unused (0.2% for SmolLM2's
# 210 layers).
RESOLUTION = 100_000


@dataclass(frozen=True)
class LayerChoice:
    layer: str
    label: str
    numel: int
    bytes: int
    kl: float  # predicted (or measured) KL of this layer alone in this format
    measured: bool

    @property
    def bits(self) -> float:
        return 8 * self.bytes / self.numel


@dataclass(frozen=True)
class BudgetPlan:
    """The chosen format per layer, in model order."""

    budget: float
    choices: tuple[LayerChoice, ...]

    @property
    def bits_per_weight(self) -> float:
        return 8 * sum(c.bytes for c in self.choices) / sum(c.numel for c in self.choices)

    @property
    def predicted_kl(self) -> float:
        return sum(c.kl for c in self.choices)

    @property
    def plan(self) -> QuantPlan:
        """One rule per layer, its full name as the pattern (a name holds no fnmatch wildcard)."""
        return QuantPlan(tuple(PlanRule(c.layer, QuantConfig.parse(c.label)) for c in self.choices),
                         name=f"budget {self.budget:g}")


def plan_for_budget(model: nn.Module | None, budget: float, *, candidates: Sequence[str] | None = None,
                    batches: Sequence | None = None, sensitivity: Sensitivity | None = None,
                    weights: LazyWeights | None = None, progress: bool = True) -> BudgetPlan:
    """The format per layer that minimizes the predicted total KL at no more than ``budget`` bits per weight.

    ``sensitivity``: a table already measured (``measure_sensitivity``); otherwise it is measured on ``model``
    with ``batches`` (calibration windows: ``lowbit.calibration.importance.calibration_batches``) for ``candidates``
    (default ``DEFAULT_CANDIDATES``); ``weights``: ``model`` was built on the meta device
    (``lowbit.models.lazy.load_lazily``) and is read from them one block at a time.
    """
    if not (isinstance(budget, (int, float)) and math.isfinite(budget) and budget > 0):
        raise InputError(f"the budget is a positive number of bits per weight, got {budget!r}")
    BUDGET.check(budget, "the budget")  # at most fp32's 32 bits (docs/limits.md)
    if sensitivity is None:
        if model is None or batches is None:
            raise InputError("plan_for_budget needs sensitivity= or both model and batches= (calibration windows)")
        sensitivity = measure_sensitivity(model, candidates or DEFAULT_CANDIDATES, batches, weights=weights,
                                          progress=progress)
    elif candidates is not None:
        missing = [c for c in candidates if QuantConfig.parse(c).label not in sensitivity.candidates]
        if missing:
            raise InputError(f"candidate {missing[0]} is not in the sensitivity table (it holds "
                             f"{', '.join(sensitivity.candidates)})")
    return choose(sensitivity, budget, candidates)


def budget_bytes(budget: float, numel: int) -> int:
    """The most bytes ``numel`` weights may take at ``budget`` bits each, exactly: the budget is read as the shortest
    decimal that round-trips to it (``repr``: the 3.3 a user typed, not float 3.29999...), so a budget equal to a
    mix's bits per weight admits that mix."""
    return math.floor(Fraction(repr(float(budget))) * numel / 8)


def choose(sensitivity: Sensitivity, budget: float, candidates: Sequence[str] | None = None) -> BudgetPlan:
    """The dynamic programme over a sensitivity table (module docstring); ``candidates`` limits the labels."""
    allowed = None if candidates is None else {QuantConfig.parse(c).label for c in candidates}
    layers = list(sensitivity.numel)
    options = []
    for name in layers:
        costs = {label: c for label, c in sensitivity.costs[name].items() if allowed is None or label in allowed}
        if not costs:
            raise InputError(f"no candidate can hold layer {name}")
        options.append(sorted(costs.items(), key=lambda kv: kv[1].bytes))
    numel = sum(sensitivity.numel.values())
    cap = budget_bytes(budget, numel)
    base = [o[0][1].bytes for o in options]  # each layer's smallest candidate
    smallest = sum(base)
    if smallest > cap:
        least = sorted({o[0][0] for o in options})
        raise InputError(f"a budget of {budget:g} bits per weight is below the smallest mix of the candidates: "
                         f"{8 * smallest / numel:.4f} bits per weight with every layer at its smallest "
                         f"({', '.join(least)}); give a larger budget or a smaller candidate")
    # the programme runs over the bytes beyond the smallest mix: that mix costs 0 units, so rounding up can never
    # shut it out (a budget of exactly the smallest mix was refused when whole bytes were rounded; issue 25)
    slack = cap - smallest
    unit = max(1, math.ceil(slack / RESOLUTION))
    units = slack // unit
    best = np.zeros(units + 1)  # best[c]: least KL of the layers so far within c units of extra bytes
    picks = np.zeros((len(options), units + 1), dtype=np.int8)
    for i, layer in enumerate(options):
        new = np.full(units + 1, np.inf)
        for k, (_, cost) in enumerate(layer):
            w = math.ceil((cost.bytes - base[i]) / unit)
            if w > units:
                continue
            shifted = np.full(units + 1, np.inf)
            shifted[w:] = best[: units + 1 - w] + cost.kl
            better = shifted < new
            new[better], picks[i, better] = shifted[better], k
        best = new
    chosen, c = [], units
    for i in reversed(range(len(options))):
        label, cost = options[i][picks[i, c]]
        chosen.append(LayerChoice(layers[i], label, sensitivity.numel[layers[i]], cost.bytes, cost.kl, cost.measured))
        c -= math.ceil((cost.bytes - base[i]) / unit)
    return BudgetPlan(float(budget), tuple(reversed(chosen)))


def check_table(table: Sensitivity, info, model: nn.Module, path: str) -> None:
    """A table read with --sensitivity must be this model's: same file, every layer present."""
    made_on = table.model.get("file_hash")
    if made_on and made_on != info.file_hash:
        raise InputError(f"{path} was measured on another model ({table.model.get('name')}, sha256 "
                         f"{made_on[:12]}...), not {info.name}")
    names = {n for names, _ in linears(model) for n in names}
    missing = [n for n in table.numel if n not in names]
    if missing:
        raise InputError(f"{path} names layer {missing[0]}, which {info.name} does not have")
