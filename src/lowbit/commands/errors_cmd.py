"""`lowbit errors`: how much of each weight matrix each format loses (SQNR, dB), without running the model.

Every selected ``nn.Linear`` weight W is quantized to each format and dequantized to Ŵ;
``lowbit.eval.tensor.tensor_errors(W, Ŵ)`` gives its errors. The table has one row per layer
kind (the layer names with their block numbers written ``*``, e.g. ``model.layers.*.mlp.down_proj``:
also a ``--layers`` pattern), each the mean SQNR of its layers, then the mean over every layer,
the worst layer, and the stored bits per weight with the Gaussian rate-distortion SQNR at that
rate for comparison (``lowbit.eval.tensor.gaussian_sqnr_bound``). ``--all``: one row per layer.
Means are of the dB figures, every layer counting once. ``--json`` holds every layer's errors.

Activation-weighted searches (``@amse``, ``@ahqq``) need each layer's mean squared input activations
(``lowbit.calibration.importance``): they are collected from the ``--calibrate`` windows right after the ones
``lowbit compare`` scores with the same ``--text/--window/--windows``, so such a format quantizes here
exactly as it does there. Every format then also gets an activation-weighted SQNR
(``tensor_errors(..., weights=importance)``), the diagonal approximation of each layer's output SQNR.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict
from types import SimpleNamespace

import torch
from rich.table import Table
from torch import nn

from .. import __version__
from .. import limits as L
from ..calibration.importance import DEFAULT_CALIBRATE, calibrate
from ..errors import InputError, LowbitError
from ..eval.protocol import paragraphs, read_text, token_windows
from ..eval.tensor import gaussian_sqnr_bound, tensor_errors
from ..evaluate import DEFAULT_FORMATS
from ..files.atomic import write_json
from ..files.outputs import check_outputs
from ..io.model_io import local_source
from ..layers.surgery import check_plan, quantize_weight, select_linears
from ..models.loader import CAUSAL_LM
from ..planning.config import QuantConfig
from ..planning.plan import QuantPlan
from ..progress import progress_bar
from ..tensor import QuantizedTensor
from .common import add_model_arg, add_protocol_args, check_protocol_args, console, load, parse_plans


def add_parser(sub) -> None:
    p = sub.add_parser("errors",
                       description="Quantize every selected nn.Linear weight to each format and print its SQNR "
                                   "(signal to quantization noise, dB; higher is better): one row per layer kind "
                                   "(mean over its layers; --all: one per layer), the mean over all layers, the "
                                   "worst layer, and each format's stored bits per weight. The model runs only "
                                   "for activation-weighted searches (@amse, @ahqq), on calibration text.")
    add_model_arg(p)
    p.add_argument("--formats", default=",".join(DEFAULT_FORMATS),
                   help="comma-separated FORMAT[/BLOCK][+dq][@SEARCH], e.g. nf4,int4/128,nf4+dq,int4_asym/64@hqq "
                        "(default: %(default)s)")
    p.add_argument("--layers", action="append", metavar="PATTERN",
                   help="measure only the nn.Linear layers whose name (or a dotted tail of it) matches this fnmatch "
                        "pattern, e.g. 'mlp.*', 'model.layers.0.*', 'lm_head' (repeatable; default: every layer "
                        "but lm_head)")
    p.add_argument("--all", action="store_true", help="one row per layer instead of one per layer kind")
    add_protocol_args(p)  # --text/--window/--windows place the calibration windows as lowbit compare does
    p.add_argument("--calibrate", type=L.CALIBRATE.arg("--calibrate"), metavar="N",
                   help="calibration windows for activation-weighted searches (@amse, @ahqq): the N windows of "
                        f"--window tokens right after those lowbit compare scores (default 16; {L.CALIBRATE.text()})")
    p.set_defaults(run=run)


def run(args) -> int:
    """Exit 0 when every format was measured, 1 when some could not be applied (the table says why)."""
    labels = [label for label in args.formats.split(",") if label.strip()]
    if not labels:
        raise InputError("--formats names no format")
    # --layers selects exactly what it matches, lm_head too; without it, QuantPlan.uniform's default (all but lm_head)
    selection = SimpleNamespace(include=args.layers, exclude=[] if args.layers else None)
    plans = parse_plans(labels, selection)
    whole = next((p.label for p in plans if p.uniform_config.method or p.uniform_config.rotate
                  or p.uniform_config.awq), None)
    if whole:  # quantize_weight would drop them silently
        raise InputError(f"{whole}: lowbit errors measures each weight tensor rounded on its own; +gptq, +had and "
                         "+awq change a layer against its inputs: score them with lowbit compare")
    _check_calibrate(args.calibrate, plans)
    check_protocol_args(args)  # --window/--windows/--text and the --json path, before the model loads
    check_outputs([args.json], [args.text, local_source(args.model)])
    con = console()
    model, tokenizer, info = load(args.model, con)

    calibration = {}

    def importance(names: list[str]) -> dict:
        calibration.update(text=read_text(args.text)[0], window=args.window, scored=_scored(tokenizer, info, args),
                           windows=args.calibrate or DEFAULT_CALIBRATE)
        start = time.perf_counter()
        found = calibrate(model, tokenizer, info.kind, args.text, window=args.window, scored=calibration["scored"],
                          count=calibration["windows"], layers=names)
        calibration["seconds"] = time.perf_counter() - start
        return found

    measured = measure(model, plans, patterns=args.layers, importance=importance)
    report = {"lowbit_version": __version__, "model": asdict(info), **measured,
              **({"calibration": calibration} if calibration else {})}
    con.print(errors_table(report, per_layer=args.all))
    if args.json:
        write_json(args.json, report)
        con.print(f"wrote {args.json}")
    return 1 if any("error" in f for f in report["formats"]) else 0


def measure(model: nn.Module, plans: list[QuantPlan], *, patterns=None, importance=None,
            progress: bool = True) -> dict:
    """``{"layers": [{name, shape}], "formats": [...]}``: per format its label, stored bits per weight, mean
    and worst SQNR and every layer's ``TensorErrors.to_dict()`` (same order as ``layers``), or an ``error``
    when the format cannot hold some layer. ``plans`` are uniform and share one selection (``parse_plans`` gives
    them the same ``include``/``exclude``); ``patterns`` only words the error when it selects nothing.

    ``importance``: ``{layer name: (in_features,) mean squared input}``, or a callable taking the selected
    layer names and returning it, called only if a format that can be applied needs calibration. Given,
    every layer's errors also hold the activation-weighted MSE and SQNR."""
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
    with progress_bar(len(targets), "measuring layers", enabled=progress) as advance:
        for names, linear in targets:
            weight = linear.weight.detach()
            imp = None if importance is None else importance[names[0]]
            for config in configs:
                if config.label in failed:
                    continue
                try:
                    q = _quantize_weight(weight, config, imp if config.needs_calibration else None)
                except LowbitError as e:  # a value the format cannot hold; the layer is named, as quantize_model does
                    failed[config.label] = f"layer {names[0]!r} (weight {'x'.join(map(str, weight.shape))}): {e}"
                    continue
                stored[config.label] += q.nbytes
                per_format[config.label].append(tensor_errors(weight, q.dequantize(), weights=imp).to_dict())
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


def _select(model: nn.Module, plan: QuantPlan, patterns) -> list:
    targets = select_linears(model, plan)
    if not targets:
        names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        what = f"--layers {' '.join(map(repr, patterns))}" if patterns else "the default selection"
        example = f"; names look like {names[0]!r} (a pattern may match a dotted tail: 'q_proj', 'mlp.*')" \
            if names else ""
        raise InputError(f"{what} matched no nn.Linear layer of this model{example}")
    return targets


def _quantize_weight(weight: torch.Tensor, config: QuantConfig, importance: torch.Tensor | None) -> QuantizedTensor:
    """The one place a config becomes a quantized weight: as ``quantize_model`` does it (format, block,
    double quant, scale search; ``importance`` for the activation-weighted searches)."""
    return quantize_weight(weight, config, importance)


def _check_calibrate(count: int | None, plans: list[QuantPlan]) -> None:
    if count is not None and count < 1:
        raise InputError(f"--calibrate needs at least 1 window, got {count}")
    if count is not None and not any(p.needs_calibration for p in plans):
        raise InputError("--calibrate is for activation-weighted searches, and no format asks for one: "
                         "add @amse or @ahqq to a format, e.g. nf4@amse")


def _scored(tokenizer, info, args) -> int:
    """How many windows (causal LM) or paragraphs (encoder) lowbit compare scores with these arguments:
    calibration starts after them (``evaluate.calibration_for``)."""
    name, body = read_text(args.text)
    if info.kind == CAUSAL_LM:
        return token_windows(tokenizer, body, name, window=args.window, windows=args.windows)[1].windows
    return len(paragraphs(body))  # what encoder_reference scores


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def errors_table(report: dict, *, per_layer: bool = False) -> Table:
    """``report``: what ``run`` writes as JSON. Rows: layer kinds (or layers), mean, worst, bits, bound."""
    ok = [f for f in report["formats"] if "error" not in f]
    names = [layer["name"] for layer in report["layers"]]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name if per_layer else layer_kind(name), []).append(i)
    title = f"{report['model'].get('name') or report['model']['source']}: weight SQNR (dB)"
    table = Table(title=title if per_layer else f"{title}, each kind's mean")
    table.add_column("layer" if per_layer else "layer kind", no_wrap=True)
    table.add_column("layers", justify="right")
    for f in ok:
        table.add_column(f["format"], justify="right", no_wrap=True)

    def row(label, count, cells, style=None):
        table.add_row(label, count, *cells, style=style)

    for key, members in groups.items():
        row(key, str(len(members)), (_db(sum(f["layers"][i]["sqnr_db"] for i in members) / len(members)) for f in ok))
    table.add_section()
    row("mean", str(len(names)), (_db(f["mean_sqnr_db"]) for f in ok), style="bold")
    row("worst layer", "", (_db(f["min_sqnr_db"]) for f in ok))
    if ok and "mean_weighted_sqnr_db" in ok[0]:
        row("mean, activation-weighted", str(len(names)), (_db(f["mean_weighted_sqnr_db"]) for f in ok))
    row("bits/weight", "", (f"{f['bits_per_weight']:.3f}" for f in ok))
    row("Gaussian bound", "", (_db(f["gaussian_bound_db"]) for f in ok), style="dim")
    notes = [f"{f['format']}: not measured: {f['error']}" for f in report["formats"] if "error" in f]
    notes.append("Gaussian bound: 6.02 dB per bit/weight (Cover & Thomas §10.3)")
    table.caption = "\n".join(notes)
    table.caption_justify = "left"
    return table


def layer_kind(name: str) -> str:
    """``model.layers.12.mlp.up_proj`` -> ``model.layers.*.mlp.up_proj``: block numbers become ``*``."""
    return ".".join("*" if re.fullmatch(r"\d+", part) else part for part in name.split("."))


def _db(value: float) -> str:
    return f"{value:.2f}"
