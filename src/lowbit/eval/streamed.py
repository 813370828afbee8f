"""A model larger than memory quantized as it is scored, block by block: ``compare``'s rows for a model built on the
meta device (``lowbit.models.lazy``) and a plan without calibration.

While block ``i`` runs (``lowbit.eval.blockwise``), its layers are read from the checkpoint one at a time and
rounded (``quantize_model(only=, sink=)``, as ``lowbit quantize`` streams them to its files), the rest of the block
is read, the rounded layers are dequantized, and after the block ran all of it is dropped; the layers outside the
blocks (an output head the plan quantizes) are rounded once for the whole run. Memory holds one block, in float32,
beside what lies outside the blocks, whatever the model's depth. The weights rounded are the ones ``quantize_model``
rounds on the whole model, so a row is the one ``compare`` gives for a model in memory, to the bit
(tests/test_evaluate_streamed.py).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..layers.linear import QuantLinear
from ..layers.outlier_linear import Int8OutlierLinear
from ..layers.surgery import QuantizeReport, model_weight_bytes, plan_layers, quantize_model
from ..planning.plan import QuantPlan
from .blockwise import Onloaded, block_names, block_parameters, materialized
from .tensor import sqnr_db


class Rounded(Onloaded):
    """``model`` (on the meta device, read from ``weights``) quantized as ``plan`` says while it runs; ``keep``:
    the tensors left in float rounded through that dtype (``--keep-dtype``). After the run, ``report()`` is what
    ``quantize_model`` reports of the whole model, and ``layer_sqnr``, ``block_size``, ``float_path_share`` and
    ``weight_bytes`` what ``compare`` reads from a quantized model in memory."""

    def __init__(self, model: nn.Module, weights, plan: QuantPlan, keep: torch.dtype | None = None):
        super().__init__(model, weights, keep)
        self.plan = plan
        targets = plan_layers(model, plan)
        self.order = [names[0] for names, *_ in targets]  # model order: the reports' and the SQNR list's
        blocks = block_names(model)
        self.layers = {b: [n for n in self.order if n.startswith(f"{b}.")] for b in blocks}
        inside = {n for names in self.layers.values() for n in names}
        self.outside_layers = [n for n in self.order if n not in inside]
        self.aliases = {names[0]: names for names, *_ in targets}
        # what the model holds before any layer is rounded (a meta tensor as what it will hold once read), and what
        # --keep-dtype saves on the tensors left in float: together with each part's change, the stored bytes
        self.before = model_weight_bytes(model, meta=True)
        self.saved = rounding_saves(model, keep, {f"{n}.weight" for names in self.aliases.values() for n in names})
        self.parts: list[QuantizeReport] = []
        self.sqnr: dict[str, float] = {}
        self.block_sizes: dict[str, int] = {}
        self.outliers = [0, 0]  # Int8OutlierLinear's float columns, columns seen
        self._source = _Remembered(weights)

    @contextmanager
    def outside(self, blocks: list[str]) -> Iterator[None]:
        read_later = [f"{n}.weight" for layer in self.outside_layers for n in self.aliases[layer]]
        self.weights.onload(self.model, skip=block_parameters(self.model, blocks) + read_later)
        try:
            made = self._quantize(self.outside_layers)  # from the float weights, before --keep-dtype rounds them
            self.round(self.model)
            originals = {n: self.model.get_submodule(n) for names, _ in made for n in names}
            try:
                _swap(self.model, made)
                with materialized(q for _, q in made):
                    yield
                self._count(made)
            finally:
                _swap(self.model, [([n], m) for n, m in originals.items()])
        finally:
            self.put_back()

    @contextmanager
    def block(self, name: str) -> Iterator[None]:
        made = self._quantize(self.layers[name])  # before the block is touched: each part sees the same model
        parent, _, child = name.rpartition(".")
        holder = self.model.get_submodule(parent)
        original = getattr(holder, child)
        setattr(holder, child, copy.deepcopy(original))  # on the meta device: a copy of its structure alone
        try:
            _swap(self.model, made)
            self.weights.onload(self.model, under=name)  # the rest of the copy: norms, biases, layers left in float
            self.round(self.model.get_submodule(name))
            with materialized(q for _, q in made):
                yield
            self._count(made)
        finally:
            setattr(holder, child, original)  # the copy, and every tensor read for it, dropped

    def _quantize(self, layers: list[str]) -> list[tuple[list[str], QuantLinear]]:
        """``layers`` (first names) quantized, from the checkpoint or, where read in already, from memory: each
        ``(names, layer)``; the part's report, SQNR and block sizes kept."""
        if not layers:
            return []
        made = []

        def keep(names, layer, config, fallen_back_from) -> None:
            key = f"{names[0]}.weight"
            rounded_from = self._source.taken.pop(key, None)
            if rounded_from is None:  # read in with the rest (a head tied to the embedding)
                rounded_from = self.model.get_submodule(names[0]).weight
            self.sqnr[names[0]] = sqnr_db(rounded_from, layer.effective_weight())
            self.block_sizes[names[0]] = layer.qweight.block_size
            made.append((names, layer))

        self.parts.append(quantize_model(self.model, self.plan, progress=False, source=self._source, sink=keep,
                                         only=layers))
        return made

    def _count(self, made: list[tuple[list[str], QuantLinear]]) -> None:
        for _, layer in made:
            if isinstance(layer, Int8OutlierLinear):
                self.outliers[0] += layer.float_columns
                self.outliers[1] += layer.columns_seen

    def report(self) -> QuantizeReport:
        """The parts' reports joined, in model order."""
        first = {part.layers[0]: part for part in self.parts}
        return QuantizeReport.combine([first[n] for n in self.order if n in first])

    @property
    def weight_bytes(self) -> int:
        """The bytes the quantized model holds (``model_weight_bytes`` of it in memory, less what ``keep`` saves):
        each part changed the model by its own rounded layers, whatever the model held around them then."""
        return self.before + sum(p.model_bytes_after - p.model_bytes_before for p in self.parts) - self.saved

    @property
    def layer_sqnr(self) -> dict:
        """``evaluate.layer_sqnr``'s record: per quantized layer, in model order, the SQNR (dB) of its weight."""
        return {"layers": list(self.order), "sqnr_db": [self.sqnr[n] for n in self.order]}

    @property
    def block_size(self) -> int:
        """The first quantized layer's block size (``evaluate.report_block``)."""
        return self.block_sizes[self.order[0]]

    @property
    def float_path_share(self) -> float | None:
        """``layers.outlier_linear.float_path_share`` over every block's Int8OutlierLinear layers."""
        return self.outliers[0] / self.outliers[1] if self.outliers[1] else None


class _Remembered:
    """A ``LazyWeights`` whose reads are also kept in ``taken`` until the caller takes them: the float weight a
    layer is rounded from, for its SQNR, without reading it twice."""

    def __init__(self, weights):
        self.weights, self.taken = weights, {}

    def read(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        self.taken[name] = t = self.weights.read(name, dtype)
        return t


def _swap(model: nn.Module, layers: list[tuple[list[str], nn.Module]]) -> None:
    """Each module put in ``model`` under each of its names (``quantize_model``'s swap)."""
    for names, module in layers:
        for name in names:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module)


def rounding_saves(model: nn.Module, keep: torch.dtype | None, replaced: set[str]) -> int:
    """What ``layers.keep_dtype.round_state`` returns for ``model`` once the weights named in ``replaced`` are
    quantized: the bytes ``keep`` saves on every other float tensor of its state, each tensor once (a meta one
    counted as what it will hold)."""
    if keep is None:
        return 0
    saved, seen = 0, set()
    for key, t in model.state_dict(keep_vars=True).items():
        if key in replaced or not t.is_floating_point() or t.dtype == keep or id(t) in seen:
            continue
        seen.add(id(t))
        saved += t.numel() * (t.element_size() - keep.itemsize)
    return saved
