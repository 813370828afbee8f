"""What `lowbit errors` measures: how much of each weight matrix each format loses, without running the model.

Every selected ``nn.Linear`` weight W is quantized to each format as ``quantize_model`` would and dequantized to
Ŵ; ``lowbit.eval.tensor.tensor_errors(W, Ŵ)`` gives its errors. Activation-weighted searches (``@amse``,
``@ahqq``) take each layer's mean squared input activations (``lowbit.calibration.importance``), collected from
the calibration windows right after the ones ``lowbit compare`` scores (``calibration``), so such a format
quantizes here exactly as it does there; every format then also gets an activation-weighted SQNR.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..calibration.importance import DEFAULT_CALIBRATE, calibrate
from ..cluster.pool import SERIAL, Pool
from ..errors import InputError, LowbitError
from ..eval.protocol import paragraphs, read_text, token_windows
from ..eval.tensor import gaussian_sqnr_bound, tensor_errors
from ..layers.surgery import check_plan, quantize_weight, select_linears
from ..models.loader import CAUSAL_LM
from ..planning.plan import QuantPlan
from ..progress import progress_bar


def check_measurable(plans: list[QuantPlan]) -> None:
    """An InputError for a plan whose methods change a layer against its inputs: each weight here is rounded
    on its own (``quantize_weight`` would drop them silently)."""
    whole = next((p for p in plans if p.uniform_config.methods), None)
    if whole:
        raise InputError(f"{whole.label}: lowbit errors measures each weight tensor rounded on its own; "
                         f"{', '.join(whole.uniform_config.methods)} change a layer against its inputs or its "
                         "basis: score them with lowbit compare")


def calibration(model: nn.Module, tokenizer, info, text: str | None, *, window: int, windows: int,
                count: int | None) -> tuple:
    """``(importance, record)`` for ``measure``: ``importance(layer names)`` collects the layers' mean squared
    inputs from ``count`` (default ``DEFAULT_CALIBRATE``) windows of ``text`` after the ``windows`` that lowbit
    compare scores; ``record`` (empty until it is called) says what it read and how long it took."""
    record = {}

    def importance(names: list[str]) -> dict:
        record.update(text=read_text(text)[0], window=window,
                      scored=scored_windows(tokenizer, info, text, window=window, windows=windows),
                      windows=count or DEFAULT_CALIBRATE)
        start = time.perf_counter()
        found = calibrate(model, tokenizer, info.kind, text, window=window, scored=record["scored"],
                          count=record["windows"], layers=names)
        record["seconds"] = time.perf_counter() - start
        return found

    return importance, record


def measure(model: nn.Module, plans: list[QuantPlan], *, patterns=None, importance=None,
            progress: bool = True, pool: Pool = SERIAL) -> dict:
    """``{"layers": [{name, shape}], "formats": [...]}``: per format its label, stored bits per weight, mean
    and worst SQNR and every layer's ``TensorErrors.to_dict()`` (same order as ``layers``), or an ``error``
    when the format cannot hold some layer. ``plans`` are uniform and share one selection (``parse_plans`` gives
    them the same ``include``/``exclude``); ``patterns`` only words the error when it selects nothing.

    ``importance``: ``{layer name: (in_features,) mean squared input}``, or a callable taking the selected
    layer names and returning it, called only if a format that can be applied needs calibration. Given,
    every layer's errors also hold the activation-weighted MSE and SQNR. ``pool``: where each layer is rounded
    and measured (``lowbit.cluster.pool``: here, or a Ray task per layer); the results are the same."""
    targets = _select(model, plans[0], patterns)
    configs = [p.uniform_config for p in plans]
    failed = {}
    for plan, config in zip(plans, configs, strict=True):
        try:
            check_plan(model, plan)  # a layout the model cannot hold fails before any layer is measured
        except LowbitError as e:
            failed[config.label] = str(e)
    if len(failed) == len(configs):
        raise InputError(next(iter(failed.values())) if len(failed) == 1 else
                         f"no format can be applied to this model: {'; '.join(failed.values())}")
    if callable(importance):
        wanted = any(c.needs_calibration for c in configs if c.label not in failed)
        importance = importance([names[0] for names, _ in targets]) if wanted else None
    per_format = {c.label: [] for c in configs if c.label not in failed}
    stored = dict.fromkeys(per_format, 0)
    # one unit per layer, drawn as the pool wants it: with the formats not failed so far (the serial pool draws each
    # after the previous layer's results are counted, so it rounds exactly what a plain loop would)
    units = ((names[0], linear.weight.detach(), None if importance is None else importance[names[0]],
              [c for c in configs if c.label not in failed]) for names, linear in targets)
    measured = pool.map(_layer_errors, units)
    with progress_bar(len(targets), "measuring layers", enabled=progress) as advance:
        for found in measured:
            for label, result in found.items():
                if label in failed:  # a layer before this one failed it (a unit drawn ahead did not know)
                    continue
                if isinstance(result, str):
                    failed[label] = result
                    continue
                nbytes, errors = result
                stored[label] += nbytes
                per_format[label].append(errors)
            advance()
    layers = [{"name": names[0], "shape": list(linear.weight.shape)} for names, linear in targets]
    numel = sum(linear.weight.numel() for _, linear in targets)
    formats = []
    for config in configs:
        if config.label in failed:
            formats.append({"format": config.label, "error": failed[config.label]})
            continue
        errors = per_format[config.label]
        sqnr = [e["sqnr_db"] for e in errors]
        worst = min(range(len(sqnr)), key=sqnr.__getitem__)
        bits = 8 * stored[config.label] / numel
        summary = {"format": config.label, "bits_per_weight": bits, "mean_sqnr_db": _mean(sqnr),
                   "min_sqnr_db": sqnr[worst], "min_layer": layers[worst]["name"],
                   "gaussian_bound_db": gaussian_sqnr_bound(bits)}
        if importance is not None:
            summary["mean_weighted_sqnr_db"] = _mean([e["weighted_sqnr_db"] for e in errors])
        formats.append({**summary, "layers": errors})
    return {"layers": layers, "formats": formats}


def _layer_errors(name: str, weight: torch.Tensor, importance: torch.Tensor | None, configs: list) -> dict:
    """One unit of ``measure``: ``{label: (stored bytes, TensorErrors.to_dict())}`` of ``weight`` rounded to each
    of ``configs`` as ``quantize_model`` would, or ``{label: why}`` where the format cannot hold a value."""
    found = {}
    for config in configs:
        try:
            q = quantize_weight(weight, config, importance if config.needs_calibration else None)
        except LowbitError as e:  # a value the format cannot hold; the layer is named, as quantize_model does
            found[config.label] = f"layer {name!r} (weight {'x'.join(map(str, weight.shape))}): {e}"
            continue
        found[config.label] = (q.nbytes, tensor_errors(weight, q.dequantize(), weights=importance).to_dict())
    return found


def _select(model: nn.Module, plan: QuantPlan, patterns) -> list:
    targets = select_linears(model, plan)
    if not targets:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        what = f"--layers {' '.join(map(repr, patterns))}" if patterns else "the default selection"
        example = f"; names look like {names[0]!r} (a pattern may match a dotted tail: 'q_proj', 'mlp.*')" \
            if names else ""
        raise InputError(f"{what} matched no nn.Linear layer of this model{example}")
    return targets


def scored_windows(tokenizer, info, text: str | None, *, window: int, windows: int) -> int:
    """How many windows (causal LM) or paragraphs (encoder) lowbit compare scores of ``text`` with these
    arguments: calibration starts after them (``evaluate.calibration_for``)."""
    name, body = read_text(text)
    if info.kind == CAUSAL_LM:
        return token_windows(tokenizer, body, name, window=window, windows=windows)[1].windows
    return len(paragraphs(body))  # what encoder_reference scores


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)
