"""Model surgery: replace a model's nn.Linear layers by QuantLinear, in place."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..cluster.pool import SERIAL, Pool
from ..errors import InputError, LayerQuantizeError, LowbitError
from ..planning.config import QuantConfig
from ..planning.plan import QuantPlan
from ..progress import progress_bar
from ..quantize import quantize
from ..tensor import QuantizedTensor
from .hf_quantizer import refuse_save_pretrained
from .linear import QuantLinear

# what ``quantize_model(sink=)`` hands each quantized layer to: (names, layer, config, the label it fell back from)
Sink = Callable[[list[str], QuantLinear, QuantConfig, str | None], None]


@dataclass(frozen=True)
class QuantizeReport:
    """What ``quantize_model`` did. Bytes are measured from stored tensors, never estimated.

    ``layer_bytes_*``: the replaced layers' weights only (fp32 ``numel * element_size``
    before, ``QuantizedTensor.nbytes`` after). ``model_bytes_*``: every tensor the model
    holds (parameters, buffers, packed parts, cached dequantized weights), shared or tied
    tensors counted once.
    """

    format: str
    layers: tuple[str, ...]
    layer_numel: int
    layer_bytes_before: int
    layer_bytes_after: int
    model_bytes_before: int
    model_bytes_after: int
    seconds: float
    layer_configs: tuple[tuple[str, str], ...] = ()  # (layer, the label it was quantized with)
    fallbacks: tuple[tuple[str, str], ...] = ()  # (layer, the label its rule named but its shape cannot hold)

    @property
    def format_counts(self) -> dict[str, int]:
        """Layers per label, most first: ``{"nf4/32+dq@amse": 180, "q8_0": 30}``."""
        counts = Counter(label for _, label in self.layer_configs)
        return dict(counts.most_common())

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight of the replaced layers, scales and metadata included."""
        return 8 * self.layer_bytes_after / self.layer_numel if self.layer_numel else 0.0

    @classmethod
    def combine(cls, parts: Sequence[QuantizeReport]) -> QuantizeReport:
        """One report for a model quantized in parts, each handed to a sink (``quantize_model(..., only=,
        sink=)``): the layers in the parts' order, bytes and seconds summed; the model's bytes change by what each
        part changed."""
        before = parts[0].model_bytes_before
        return replace(
            parts[0], layers=tuple(n for p in parts for n in p.layers),
            layer_numel=sum(p.layer_numel for p in parts),
            layer_bytes_before=sum(p.layer_bytes_before for p in parts),
            layer_bytes_after=sum(p.layer_bytes_after for p in parts),
            model_bytes_after=before + sum(p.model_bytes_after - p.model_bytes_before for p in parts),
            seconds=sum(p.seconds for p in parts),
            layer_configs=tuple(c for p in parts for c in p.layer_configs),
            fallbacks=tuple(f for p in parts for f in p.fallbacks))

    @property
    def layer_ratio(self) -> float:
        return self.layer_bytes_after / self.layer_bytes_before if self.layer_bytes_before else 1.0

    @property
    def model_ratio(self) -> float:
        return self.model_bytes_after / self.model_bytes_before if self.model_bytes_before else 1.0


def quantize_model(model: nn.Module, plan: QuantPlan, *, progress: bool = True,
                   importance: dict[str, torch.Tensor] | None = None,
                   prequantized: dict[str, QuantizedTensor] | None = None, source=None,
                   sink: Sink | None = None,
                   only: Collection[str] | None = None, pool: Pool = SERIAL) -> QuantizeReport:
    """Replace the ``nn.Linear`` layers ``plan`` selects by ``QuantLinear``, in place.

    ``plan``: per-layer rules (``lowbit.planning.plan``); one format for all is ``QuantPlan.uniform("nf4")``.
    Every layer is quantized before any is swapped, so a layer that cannot be stored in
    its format (``LayerQuantizeError``, naming it) leaves the model untouched.
    ``importance``: layer name -> ``(in_features,)`` mean squared input activation
    (``lowbit.calibration.importance``), which an activation-weighted search (``@amse``) needs.
    ``prequantized``: layer name -> its weight already quantized, used as it is: required for the layers
    whose config has a method that makes them (``+gptq``: ``lowbit.methods.calibrated.calibrate_methods``, the whole
    model's calibration pass), and how imported bytes become layers (``lowbit.io.importers``).
    ``source``: where the weights of a model built on the meta device are read from, one layer at a time as it
    is rounded (``lowbit.models.lazy.LazyWeights``): only one float weight is alive at a time. ``sink(names,
    layer, config, fallen_back_from)``: each quantized layer is handed over (to be written) instead of swapped in,
    and nothing of the model changes; the report counts the model as if it had been swapped. ``only``: the
    layers (by first name) to quantize in this call, the others left as they are and not counted in the report
    (a model quantized block by block: ``QuantizeReport.combine`` joins the parts). ``pool``: where each layer
    is rounded (``lowbit.cluster.pool``: here, or a Ray task that reads a meta weight from ``source`` itself).
    """
    if not isinstance(plan, QuantPlan):
        raise InputError(f"quantize_model takes a QuantPlan, got {type(plan).__name__}: for one format on every "
                         "layer, QuantPlan.uniform(label, include, exclude)")
    start = time.perf_counter()
    before = model_weight_bytes(model, meta=source is not None)
    targets = plan_layers(model, plan)
    if only is not None:
        only = set(only)
        targets = [t for t in targets if t[0][0] in only]
    unmade = [(names[0], c) for names, _, c, _ in targets if c.prequantized and names[0] not in (prequantized or {})]
    if unmade:
        name, config = unmade[0]
        by = next(m.suffix for m in config.method_classes if m.prequantizes)
        raise InputError(f"{name} is to be quantized by {by}, which needs the whole model's calibration pass: pass "
                         "prequantized= (lowbit.workflows.run does)")
    unmet = next((why for names, _, c, _ in targets for m in c.method_classes
                  if (why := m.unmet(model, names[0])) is not None), None)
    if unmet is not None:
        raise InputError(unmet)
    missing = [names[0] for names, _, c, _ in targets if c.needs_importance
               and not any(n in (importance or {}) for n in names)]
    if missing:
        search = next(c.search for names, _, c, _ in targets if names[0] == missing[0])
        raise InputError(f"@{search} needs calibration activations for every layer it quantizes; none for "
                         f"{missing[0]}{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")

    replacements: list[tuple[list[str], QuantLinear]] = []
    uniform = plan.uniform_config
    what = uniform.format_name if uniform is not None else plan.label
    layer_numel = layer_before = layer_after = 0
    units = ((names[0], None if linear.weight.is_meta else linear.weight.detach(), c,
              next((importance[n] for n in names if n in (importance or {})), None) if c.needs_calibration else None)
             for names, linear, c, _ in targets if names[0] not in (prequantized or {}))
    rounded = pool.map(_rounded, units, shared=(source,))
    with progress_bar(len(targets), f"quantizing to {what}", enabled=progress) as advance:
        for names, linear, layer_config, wanted in targets:
            if names[0] in (prequantized or {}):
                qweight = prequantized[names[0]]
                signs = layer_config.layer_signs(names[0], linear.in_features)
            else:
                qweight, signs = next(rounded)
            qlinear = layer_module(names[0], linear, qweight, signs, layer_config)
            layer_numel += qlinear.qweight.numel
            layer_before += qlinear.qweight.numel * qlinear.qweight.dtype.itemsize
            layer_after += qlinear.nbytes
            if sink is None:
                replacements.append((names, qlinear))
            else:
                sink(names, qlinear, layer_config, wanted)
            del qweight, qlinear
            advance()

    if sink is None:
        for names, qlinear in replacements:
            for name in names:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, qlinear)
        refuse_save_pretrained(model)  # transformers' save_pretrained would silently drop every QuantLinear
        after = model_weight_bytes(model)
    else:  # the float weights the swap would have dropped: a tied head's is its embedding's too, and stays
        names_of: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            names_of.setdefault(id(p), []).append(name)
        swapped = {f"{n}.weight" for names, _, _, _ in targets for n in names}
        dropped = {id(linear.weight): linear.weight for _, linear, _, _ in targets
                   if all(n in swapped for n in names_of[id(linear.weight)])}
        after = before - sum(w.numel() * w.element_size() for w in dropped.values()) + layer_after
    return QuantizeReport(
        format=what,
        layers=tuple(name for names, _, _, _ in targets for name in names),
        layer_numel=layer_numel,
        layer_bytes_before=layer_before,
        layer_bytes_after=layer_after,
        model_bytes_before=before,
        model_bytes_after=after,
        seconds=time.perf_counter() - start,
        layer_configs=tuple((names[0], c.label) for names, _, c, _ in targets),
        fallbacks=tuple((names[0], wanted) for names, _, _, wanted in targets if wanted),
    )


def _rounded(source, name: str, weight: torch.Tensor | None, config: QuantConfig, importance: torch.Tensor | None):
    """``rounded_layer`` of one unit of ``quantize_model``: a weight on the meta device (None) read from
    ``source`` first, where the unit runs."""
    weight = source.read(f"{name}.weight") if weight is None else weight
    return rounded_layer(name, weight, config, importance)


def layer_module(name: str, linear: nn.Linear, qweight: QuantizedTensor, signs: torch.Tensor | None,
                 config: QuantConfig) -> QuantLinear:
    """The module that replaces ``linear``: the one a method of the config makes (LLM.int8()'s
    ``Int8OutlierLinear``, whose forward depends on the input), else ``QuantLinear``."""
    for method in config.method_classes:
        if (layer := method.make_layer(name, linear, qweight, signs, config)) is not None:
            return layer
    return QuantLinear.from_linear(linear, qweight, signs)


def check_plan(model: nn.Module, plan: QuantPlan) -> None:
    """Raise what ``quantize_model(model, plan)`` would for its layout, without quantizing:
    no layer selected, or a layer whose shape the format cannot hold (``LayerQuantizeError``).
    Lets ``compare`` refuse a bad format list before minutes of scoring, not halfway through."""
    plan_layers(model, plan)


def plan_layers(model: nn.Module, plan: QuantPlan) -> list[tuple[list[str], nn.Linear, QuantConfig, str | None]]:
    """``(names, linear, config, fallen_back_from)`` for each layer the plan quantizes, in model order.

    A layer whose shape its rule's format cannot hold takes the rule's fallback (the label it fell back
    from is returned); without one it is a ``LayerQuantizeError`` naming the layer.
    """
    chosen, checked = [], {}

    def holds(names, linear, config) -> LayerQuantizeError | None:
        key = (config.label, linear.in_features)
        if key not in checked:
            checked[key] = layout_error(names[0], linear, config)
        return checked[key]

    for names, linear in linears(model):
        rule = plan.rule_for(names)
        if rule is None or rule.config is None:
            continue
        error = holds(names, linear, rule.config)
        if error is None:
            chosen.append((names, linear, rule.config, None))
        elif rule.fallback is not None and holds(names, linear, rule.fallback) is None:
            chosen.append((names, linear, rule.fallback, rule.config.label))
        else:
            raise error
    if not chosen:
        if plan.uniform_config is not None:
            raise InputError(f"no nn.Linear layer matched include={plan.include} exclude={plan.exclude}")
        some = ", ".join(names[0] for names, _ in linears(model)[:3])
        raise InputError(f"the plan quantizes no nn.Linear layer (its patterns: "
                         f"{', '.join(r.pattern for r in plan.rules)}); layers are named like {some}")
    return chosen


def layout_error(name: str, linear: nn.Linear, config: QuantConfig) -> LayerQuantizeError | None:
    """Why ``config``'s layout cannot hold the layer's weight (GGUF rows of whole blocks), or None. The layout
    rules depend on the row length only, so one row of zeros is quantized to find out."""
    try:
        _quantize_layer(name, torch.zeros(1, linear.in_features), replace(config, search=None),
                        shape=linear.weight.shape)
    except LayerQuantizeError as e:
        return e
    return None


def select_linears(model: nn.Module, plan: QuantPlan) -> list[tuple[list[str], nn.Linear]]:
    """The layers ``plan`` selects, each once, with every name it is reachable under."""
    return [(names, m) for names, m in linears(model) if plan.selects(names)]


def linears(model: nn.Module) -> list[tuple[list[str], nn.Linear]]:
    """Every swappable nn.Linear, each once, with every name it is reachable under."""
    by_id: dict[int, tuple[list[str], nn.Linear]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        # nn.MultiheadAttention reads out_proj.weight directly instead of calling it, so
        # its NonDynamicallyQuantizableLinear cannot be swapped (torch.ao skips it too).
        if not isinstance(module, nn.Linear) or isinstance(module, NonDynamicallyQuantizableLinear):
            continue
        if not name:
            raise InputError("the model itself is an nn.Linear: no parent to swap it in; use QuantLinear.from_linear")
        by_id.setdefault(id(module), ([], module))[0].append(name)
    return list(by_id.values())


def model_weight_bytes(model: nn.Module, *, meta: bool = False) -> int:
    """Bytes of every tensor the model holds, each storage region counted once; ``meta``: a tensor on the meta
    device counts as what it will hold once read (``lowbit.models.lazy``), else as nothing."""
    tensors: list[torch.Tensor] = [*model.parameters(), *model.buffers()]
    for module in model.modules():
        if isinstance(module, QuantLinear):
            tensors.extend(module.qweight.parts.values())
            if module.signs is not None:
                tensors.append(module.signs)
            if module._dequantized is not None:
                tensors.append(module._dequantized)
    seen: set[tuple] = set()
    total = 0
    for t in tensors:
        if t.device.type == "meta" and not meta:  # holds no memory
            continue
        nbytes = t.numel() * t.element_size()
        # tied weights share data_ptr and size; a meta tensor has no data: a tied one is one Parameter
        key = ("meta", id(t)) if t.device.type == "meta" else (t.device, t.data_ptr(), nbytes)
        if key not in seen:
            seen.add(key)
            total += nbytes
    return total


def quantize_weight(weight: torch.Tensor, config: QuantConfig, importance: torch.Tensor | None = None):
    """One weight tensor quantized as ``config`` says (format, block, double quant, search); one block per row
    where a method says so (LLM.int8())."""
    block = weight.shape[-1] if any(m.row_blocks for m in config.method_classes) else config.block_size
    return quantize(weight, config.format, block_size=block, double_quant=config.double_quant,
                    search=config.search, importance=importance)


def rounded_layer(name: str, weight: torch.Tensor, config: QuantConfig, importance: torch.Tensor | None = None):
    """``(qweight, signs)``: one layer's weight rounded on its own as ``config`` says; with ``+had`` the weight
    is ``W Q`` and ``signs`` the rotation's (``lowbit.layers.rotation``), else None."""
    signs = config.layer_signs(name, weight.shape[1])
    weight = weight.detach()
    for method in config.method_classes:
        weight = method.prepare_weight(name, weight)
    return _quantize_layer(name, weight, config, importance=importance), signs


def _quantize_layer(name: str, weight: torch.Tensor, config: QuantConfig, shape: torch.Size | None = None,
                    importance: torch.Tensor | None = None):
    try:
        return quantize_weight(weight, config, importance)
    except LowbitError as e:
        out_f, in_f = shape or weight.shape
        raise LayerQuantizeError(f"layer {name!r} (weight {out_f}x{in_f}): {e}") from e


def reference_weight_bytes(model: nn.Module) -> int:
    """Bytes of the float32 reference of ``model``: the tensors ``model_weight_bytes`` counts, each float tensor at
    4 bytes an element and each QuantLinear at its dequantized weight's (the reference is always float32:
    ``lowbit.models.loader``), each tensor once. A quantized output head that the config ties to the input
    embedding is that embedding in the reference (quantizing a tied head stores it twice; the original held it
    once), so a saved model's reference is its original's size, as ``compare`` measured it; an untied head (a GGUF
    file with its own output.weight) is a tensor of its own, as when ``compare`` loads that file."""
    head, counted = _tied_quantized_head(model), set()
    seen: set[tuple] = set()
    total = 0
    for module in model.modules():
        if isinstance(module, QuantLinear) and module is not head and id(module) not in counted:
            counted.add(id(module))
            total += module.qweight.numel * 4
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":  # holds no memory
            continue
        key = (t.device, t.data_ptr(), t.numel() * t.element_size())  # tied tensors share data_ptr and size
        if key not in seen:
            seen.add(key)
            total += t.numel() * (4 if t.is_floating_point() else t.element_size())
    return total


def _tied_quantized_head(model: nn.Module) -> nn.Module | None:
    """The output head if it is a QuantLinear and the config ties it to the (unquantized) input embedding."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return None
    try:
        head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(embedding, "weight", None)
    if isinstance(head, QuantLinear) and weight is not None and tuple(weight.shape) == tuple(head.qweight.shape):
        return head
    return None
