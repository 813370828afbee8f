"""Quantize a model to several formats and measure what each loses (``lowbit compare`` / ``eval``).

The reference (the original model's predictions) is computed once per model file, text
and protocol and cached on disk; each format then runs only its quantized model. A causal LM
runs block by block over all scored windows (``lowbit.eval.blockwise``), so memory follows one
block; a model built on the meta device (``lowbit.models.lazy``) is read, and quantized, one
block at a time as it runs (``lowbit.eval.streamed``). For speed, scoring uses each
QuantLinear's dequantized weight (``QuantLinear.materialize``, one block at a time): the same
numbers as the packed path, which tests prove.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import platform
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

import torch
from torch import nn

from . import __version__
from .calibration.importance import DEFAULT_CALIBRATE
from .cluster.pool import SERIAL, Pool
from .errors import InputError, LowbitError, ModelLoadError
from .eval.blockwise import Dequantized, Onloaded, Resident
from .eval.causal import score_causal
from .eval.encoder import encoder_reference, score_encoder
from .eval.protocol import DEFAULT_WINDOW, read_text, token_windows
from .eval.reference import causal_reference
from .eval.streamed import Rounded, rounding_saves
from .eval.tensor import sqnr_db
from .io.model_io import load_quantized
from .layers.keep_dtype import dtype_name, round_state
from .layers.linear import QuantLinear
from .layers.outlier_linear import Int8OutlierLinear, float_path_share
from .layers.surgery import check_plan, model_weight_bytes, reference_weight_bytes
from .methods.gptq_model import GPTQ_CALIBRATE
from .models.lazy import LazyWeights, load_lazily, load_on_worker
from .models.loader import CAUSAL_LM, ModelInfo
from .planning.plan import QuantPlan
from .progress import note
from .workflows.run import Calibration, changes_model, importance_layers, run, walks_blocks

DEFAULT_FORMATS = ("int8", "q8_0", "nf4", "nf4+dq", "bnb_fp4", "fp4_e2m1", "int4/64", "q4_0", "mxfp4", "nvfp4")


class Evaluation:
    """The protocol bound to one original model: its cached reference, and ``score(model)``.

    ``reference_model`` is called only if the reference is not cached yet: it returns the model, or (a causal
    LM) a ``lowbit.eval.blockwise.Resident`` saying how its blocks' weights come into memory. ``context`` is
    the model's context length (``max_position_embeddings``): a longer window is an error;
    ``vocab_size`` lets the reference's size be checked before that model is even loaded.
    """

    def __init__(self, info: ModelInfo, tokenizer, reference_model: Callable[[], nn.Module | Resident], *, text=None,
                 window: int = DEFAULT_WINDOW, windows: int | None = None, context: int | None = None,
                 vocab_size: int | None = None, progress: bool = True):
        self.info, self.tokenizer, self.progress = info, tokenizer, progress
        name, body = read_text(text)
        if info.kind == CAUSAL_LM:
            if context is not None and window > context:
                raise InputError(f"--window {window} is longer than the model's context of {context} tokens "
                                 "(max_position_embeddings)")
            ids, self.protocol = token_windows(tokenizer, body, name, window=window, windows=windows)
            self.reference = causal_reference(reference_model, ids, self.protocol, info.file_hash,
                                              model_name=info.name, model_source=info.source,
                                              vocab_size=vocab_size, progress=progress)
            self.protocol_dict = {"kind": "causal-lm", **self.protocol.to_dict()}
        else:
            self.texts, self.embeddings = encoder_reference(reference_model, tokenizer, body, info.file_hash,
                                                            text_name=name, model_name=info.name,
                                                            model_source=info.source, progress=progress)
            self.protocol_dict = {"kind": "encoder", "text": name, "sentences": len(self.texts)}

    def reference_scores(self) -> dict:
        return {"ppl": self.reference.ppl} if self.info.kind == CAUSAL_LM else {}

    def score(self, model: nn.Module | Resident, label: str = "evaluating") -> dict:
        """The scores of ``model`` (a causal LM's may be a ``Resident``), run as it is given."""
        if self.info.kind == CAUSAL_LM:
            return score_causal(model, self.reference, label=label, progress=self.progress)
        return score_encoder(model, self.tokenizer, self.texts, self.embeddings, label=label, progress=self.progress)


def compare(model: nn.Module, tokenizer, info: ModelInfo, plans: list[QuantPlan], *, text=None,
            window: int = DEFAULT_WINDOW, windows: int | None = None, keep_dtype: torch.dtype | None = None,
            progress: bool = True, on_result: Callable[[dict], None] | None = None,
            calibrate: int | None = None, weights: LazyWeights | None = None, pool: Pool = SERIAL,
            spec: str | None = None) -> dict:
    """Quantize a copy of ``model`` as each plan says (``workflows.run``) and score it; returns the JSON report.

    A plan the model cannot hold (a layer shape, a value out of range) becomes a row with
    an ``error`` and the others are still scored; only if none can be applied is it raised.
    ``on_result(report)`` is called after each row, so a caller can save what is finished.
    ``keep_dtype``: the unquantized tensors are rounded through it first, as ``save_quantized``
    stores them; a first row ``keep <dtype>`` then shows what that alone costs.
    ``calibrate``: calibration windows, taken from the text after the scored windows
    (``lowbit.calibration.importance``); the importance of the original model is collected once for
    every row that needs it, and its time is counted in each such row's ``quantize_seconds``.
    ``weights``: ``model`` was built on the meta device (``lowbit.models.lazy.load_lazily``); a causal LM is then
    read, quantized and scored one block at a time (``lowbit.eval.streamed``: plans without calibration only), the
    same rows in the memory of one block; an encoder is read in whole first.
    ``pool``: a Ray pool (``lowbit.cluster.pool``) computes each row as a task, the model loaded there again from
    ``spec`` (``load_lazily``'s) and the reference, computed here first, read from the cache; the same rows.
    """
    rows = _Rows.prepare(model, tokenizer, info, plans, text=text, window=window, windows=windows,
                         keep_dtype=keep_dtype, calibrate=calibrate, weights=weights, progress=progress)
    report = rows.report
    labels: list[QuantPlan | None] = ([None] if rows.keep is not None else []) + list(plans)  # None: the keep row
    if pool.distributed:
        job = RowJob(spec, text, window, windows, keep_dtype, calibrate, info.file_hash)
        results = pool.map(_row_task, ((plan,) for plan in labels), shared=(job, rows.failed))
    else:
        results = map(rows.row, labels)
    for row in results:
        _add(report, row, on_result, progress)
    return report


@dataclass(frozen=True)
class RowJob:
    """What a worker needs to compute ``compare``'s rows: the model (``load_lazily(spec)``, which must be the
    files the driver read: ``file_hash``) and the arguments that decide a row."""

    spec: str | None
    text: str | None
    window: int
    windows: int | None
    keep_dtype: torch.dtype | None
    calibrate: int | None
    file_hash: str


def _row_task(job: RowJob, failed: dict[str, str], plan: QuantPlan | None) -> dict:
    """One row of ``compare`` as a unit of work (``lowbit.cluster.pool``); ``failed``: the plans the driver found
    the model cannot hold, and why (checked once, there)."""
    rows = _worker_rows(job)
    rows.failed.update(failed)
    return rows.row(plan)


@functools.lru_cache(maxsize=1)
def _worker_rows(job: RowJob) -> _Rows:
    """The rows of ``job`` as a worker computes them: the model loaded once per worker process."""
    model, tokenizer, info, weights = load_on_worker(job.spec, job.file_hash)
    return _Rows.prepare(model, tokenizer, info, [], text=job.text, window=job.window, windows=job.windows,
                         keep_dtype=job.keep_dtype, calibrate=job.calibrate, weights=weights, progress=False)


@dataclass
class _Rows:
    """``compare``'s rows of one model: ``row(plan)`` quantizes and scores one (None: the ``keep`` row)."""

    report: dict
    evaluation: Evaluation
    model: nn.Module
    weights: LazyWeights | None
    keep: torch.dtype | None
    calibration: Calibration
    failed: dict[str, str]
    progress: bool

    @classmethod
    def prepare(cls, model: nn.Module, tokenizer, info: ModelInfo, plans: list[QuantPlan], *, text, window: int,
                windows: int | None, keep_dtype: torch.dtype | None, calibrate: int | None,
                weights: LazyWeights | None, progress: bool) -> _Rows:
        """The reference, the plans checked against the model, the calibration inputs (and the shared importance
        of a model in memory) and the report's head: everything before the first row."""
        if weights is not None and info.kind != CAUSAL_LM:  # the encoder protocol runs the model whole
            weights.onload(model)
            weights = None
        failed = {}
        for plan in plans:
            try:
                check_plan(model, plan)  # a layout the model cannot hold fails now, before any scoring
            except LowbitError as e:
                failed[plan.label] = str(e)
        if plans and len(failed) == len(plans):
            raise InputError(next(iter(failed.values())) if len(failed) == 1 else
                             f"no format can be applied to this model: {'; '.join(failed.values())}")
        usable = [p for p in plans if p.label not in failed]
        evaluation = Evaluation(info, tokenizer,
                                (lambda: model) if weights is None else (lambda: Onloaded(model, weights)),
                                text=text, window=window, windows=windows, **model_limits(model), progress=progress)
        # a model on the meta device is float32 (load_lazily): what it will hold once read is its reference's bytes
        reference = reference_weight_bytes(model) if weights is None else model_weight_bytes(model, meta=True)
        report = _report(info, evaluation, reference, [])
        keep = keep_dtype if keep_dtype not in (None, torch.float32) else None
        if keep is not None:
            report["keep_dtype"] = dtype_name(keep)
        scored = evaluation.protocol.windows if info.kind == CAUSAL_LM else len(evaluation.texts)
        calibration = Calibration(tokenizer, info.kind, text, window=window, scored=scored, count=calibrate,
                                  progress=progress)
        if any(walks_blocks(p) for p in usable):  # a short text fails now, before any row
            calibration.batches(GPTQ_CALIBRATE)
        if any(c.needs_importance for p in usable for c in p.configs):
            calibration.batches(DEFAULT_CALIBRATE)
        if weights is not None:
            if any(p.needs_calibration for p in usable):  # each such row calibrates on its own: nothing shared
                report["calibration"] = {"windows": calibrate or DEFAULT_CALIBRATE, "seconds": 0.0}
        else:
            shared = [n for p in usable if not changes_model(p) for n in importance_layers(model, p)]
            if shared:
                calibration.shared_importance(model, list(dict.fromkeys(shared)))
                report["calibration"] = {"windows": calibrate or DEFAULT_CALIBRATE, "seconds": calibration.seconds}
        return cls(report, evaluation, model, weights, keep, calibration, failed, progress)

    def row(self, plan: QuantPlan | None) -> dict:
        """The row of ``plan`` (None: the ``keep`` row), an ``error`` row where the plan cannot be applied."""
        if plan is not None and plan.label in self.failed:
            return {"format": plan.label, "error": self.failed[plan.label]}
        if self.weights is not None:
            return self._streamed_row(plan)
        return self._resident_row(plan)

    def _resident_row(self, plan: QuantPlan | None) -> dict:
        """A row of a model in memory: a copy quantized whole (``workflows.run``), then scored."""
        model, keep, evaluation = self.model, self.keep, self.evaluation
        if plan is None:
            kept = copy.deepcopy(model)
            saved = round_state(kept, keep)
            return _score(evaluation, kept, f"keep {dtype_name(keep)}", False, 32.0, 0.0, saved)
        quantized = copy.deepcopy(model)
        rounded_from = float_weights(quantized)  # +awq's fold scales these tensors in place
        try:
            qreport = run(quantized, plan, self.calibration, progress=self.progress, shared=True)
        except LowbitError as e:  # e.g. a value the format cannot hold (LayerQuantizeError names the layer)
            return {"format": plan.label, "error": str(e)}
        sqnr = layer_sqnr(quantized, rounded_from)
        del rounded_from  # the float weights the layers replaced: freed before scoring materializes fp32 copies
        saved = round_state(quantized, keep) if keep is not None else 0
        double_quant = any(c.double_quant for c in plan.configs)
        row = _score(evaluation, quantized, plan.label, double_quant, qreport.bits_per_weight, qreport.seconds, saved,
                     layers=(qreport.format_counts, dict(qreport.fallbacks)))
        return row | {"layer_sqnr": sqnr}

    def _streamed_row(self, plan: QuantPlan | None) -> dict:
        """A row of a causal LM built on the meta device: the model read again, block by block, rounding each block
        as it runs (``lowbit.eval.streamed.Rounded``); a plan that calibrates is written to a temporary directory
        first (``_calibrated_row``). The same row as for the model in memory."""
        model, weights, keep, evaluation = self.model, self.weights, self.keep, self.evaluation
        if plan is None:
            label = f"keep {dtype_name(keep)}"
            stored = model_weight_bytes(model, meta=True) - rounding_saves(model, keep, set())
            row = _facts(label, None, False, 32.0, stored, 0, 0.0)
            start = time.perf_counter()
            row |= evaluation.score(Onloaded(model, weights, keep), label=f"scoring {label}")
            return row | {"eval_seconds": time.perf_counter() - start}
        if plan.needs_calibration:
            try:
                return _calibrated_row(evaluation, model, weights, plan, keep, self.calibration, progress=self.progress)
            except LowbitError as e:
                return {"format": plan.label, "error": str(e)}
        rounded = Rounded(model, weights, plan, keep)
        start = time.perf_counter()
        try:
            scores = evaluation.score(rounded, label=f"rounding and scoring {plan.label}")
        except LowbitError as e:  # e.g. a value the format cannot hold (LayerQuantizeError names the layer)
            return {"format": plan.label, "error": str(e)}
        seconds = time.perf_counter() - start
        qreport = rounded.report()
        row = _facts(plan.label, rounded.block_size, any(c.double_quant for c in plan.configs),
                     qreport.bits_per_weight, rounded.weight_bytes, len(qreport.layer_configs), qreport.seconds,
                     layers=(qreport.format_counts, dict(qreport.fallbacks)))
        row |= scores | {"eval_seconds": seconds - qreport.seconds}
        if rounded.float_path_share is not None:
            row["float_path_share"] = rounded.float_path_share
        return row | {"layer_sqnr": rounded.layer_sqnr}


def _calibrated_row(evaluation: Evaluation, model: nn.Module, weights: LazyWeights, plan: QuantPlan,
                    keep: torch.dtype | None, calibration: Calibration, *, progress: bool) -> dict:
    """The row of a plan that calibrates, for a model built on the meta device: quantized block by block into a
    temporary directory (``io.streamed.quantize_to_directory``, the bytes `lowbit quantize` writes), each layer's
    SQNR measured as it is written against the float weight it was rounded from (still in memory then, as
    ``+awq`` folded it), then loaded and scored a block at a time. Its calibration pass is its own, where the model
    in memory shares one importance pass among rows (the same numbers: tests/eval/test_streamed.py)."""
    import tempfile

    from .io.streamed import quantize_to_directory

    sqnr: dict[str, list] = {"layers": [], "sqnr_db": []}

    def measure(name: str, layer: QuantLinear) -> None:
        weight = model.get_submodule(name).weight
        weight = weights.read(f"{name}.weight") if weight.is_meta else weight
        sqnr["layers"].append(name)
        sqnr["sqnr_db"].append(sqnr_db(weight, layer.effective_weight()))

    with tempfile.TemporaryDirectory(prefix="lowbit-compare-") as tmp:
        out = f"{tmp}/{plan.label.replace('/', '_')}"
        try:
            qreport = quantize_to_directory(model, weights, evaluation.tokenizer, evaluation.info, plan, out,
                                            progress=progress, keep_dtype=keep or torch.float32,
                                            calibration=calibration, on_layer=measure)
        finally:  # the pass leaves what lies outside the blocks, and +awq's folded norms, in memory
            Onloaded(model, weights).put_back()
        quantized, _, meta = load_quantized(out)
    stored = meta["quantize"]["model_bytes_after"]  # the weights as saved (the loaded model holds some in float32)
    row = _score(evaluation, quantized, plan.label, any(c.double_quant for c in plan.configs),
                 qreport.bits_per_weight, qreport.seconds, model_weight_bytes(quantized) - stored,
                 layers=(qreport.format_counts, dict(qreport.fallbacks)))
    return row | {"layer_sqnr": sqnr}


def float_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every nn.Linear's weight by name: what the layers are rounded from (after ``+awq``'s fold)."""
    return {name: m.weight for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def layer_sqnr(quantized: nn.Module, rounded_from: dict[str, torch.Tensor]) -> dict:
    """Per quantized layer, in model order, the SQNR (dB) of the weight it computes with (``effective_weight``:
    a ``+had`` layer's unrotated) against the float weight it was rounded from (``+awq``: the scaled one), as
    ``lowbit errors`` measures a weight: ``{"layers": names, "sqnr_db": values}`` (inf for an exact layer)."""
    names, values = [], []
    for name, module in quantized.named_modules():
        if isinstance(module, QuantLinear) and name in rounded_from:
            names.append(name)
            values.append(sqnr_db(rounded_from[name], module.effective_weight()))
    return {"layers": names, "sqnr_db": values}


def _add(report: dict, result: dict, on_result: Callable[[dict], None] | None, progress: bool) -> None:
    report["results"].append(result)
    if "error" in result:
        note(f"{result['format']}: not scored: {result['error']}", enabled=progress)
    elif "kl_mean" in result:
        note(f"{result['format']}: {result['bits_per_weight']:.3f} bits/weight, KL mean {result['kl_mean']:.5f}, "
             f"same top-1 {result['top1']:.2%}", enabled=progress)
    if on_result is not None:
        on_result(report)


def model_limits(model: nn.Module) -> dict:
    """``context`` and ``vocab_size`` for ``Evaluation``, from the model's config where it has one."""
    config = getattr(model, "config", None)
    return {key: getattr(config, attr, None) for key, attr in
            (("context", "max_position_embeddings"), ("vocab_size", "vocab_size"))}


def evaluate_saved(directory, *, text=None, window: int = DEFAULT_WINDOW, windows: int | None = None,
                   progress: bool = True, load: Callable = load_lazily) -> dict:
    """Score a model written by ``lowbit quantize`` (loaded as saved, not re-quantized).

    The original model is loaded with ``load(source)`` (``load_lazily``'s ``(model, tokenizer, info, weights)``:
    a model on the meta device is read block by block) only if its reference is not cached, and must be the file
    the saved model was made from (same sha256).
    """
    model, tokenizer, meta = load_quantized(directory)
    info = ModelInfo(**meta["model"])

    def original():
        reference, _, found, weights = load(info.source)
        if found.file_hash != info.file_hash:
            raise ModelLoadError(f"the original model at {info.source} changed since {directory} was written "
                                 "(sha256 differs); its reference cannot be recomputed")
        if weights is None:
            return reference
        if info.kind != CAUSAL_LM:  # the encoder protocol runs the model whole
            weights.onload(reference)
            return reference
        return Onloaded(reference, weights)

    evaluation = Evaluation(info, tokenizer, original, text=text, window=window, windows=windows,
                            **model_limits(model), progress=progress)
    reference = reference_weight_bytes(model)  # before _score materializes fp32 copies
    config, stored = meta["config"], meta["quantize"]
    labels = Counter(layer.get("label", layer["format"]) for layer in meta["layers"].values())
    fallbacks = {name: layer["fallback_from"] for name, layer in meta["layers"].items() if "fallback_from" in layer}
    result = _score(evaluation, model, config["label"], config["double_quant"], stored["bits_per_weight"],
                    stored["seconds"], layers=(dict(labels.most_common()), fallbacks))
    # not lowbit.json's model_bytes_before: an import counted only the tensors it did not quantize (113 MB of
    # SmolLM2's 538 MB); the loaded model's tensors are exactly those the row's weight_bytes counts
    return _report(info, evaluation, reference, [result])


def _score(evaluation: Evaluation, quantized: nn.Module, label: str, double_quant: bool, bits_per_weight: float,
           quantize_seconds: float, bytes_saved: int = 0, layers: tuple[dict, dict] | None = None) -> dict:
    """One result row of a model in memory; ``layers``: (layers per label, {layer: label it fell back from}) of a
    quantized model. A causal LM's layers are dequantized one block at a time as it runs, an encoder's all first."""
    result = _facts(label, report_block(quantized), double_quant, bits_per_weight,
                    # packed, before materialize() adds fp32 copies; less what --keep-dtype saves on the rest
                    model_weight_bytes(quantized) - bytes_saved,
                    sum(isinstance(m, QuantLinear) for m in quantized.modules()), quantize_seconds, layers)
    for module in quantized.modules():
        if isinstance(module, Int8OutlierLinear):
            module.reset_counts()
    start = time.perf_counter()
    result |= evaluation.score(Dequantized(quantized) if evaluation.info.kind == CAUSAL_LM else materialize(quantized),
                               label=f"scoring {label}")
    result["eval_seconds"] = time.perf_counter() - start
    share = float_path_share(quantized)
    if share is not None:  # LLM.int8(): the input columns of every call that took the float path
        result["float_path_share"] = share
    return result


def _facts(label: str, block_size: int | None, double_quant: bool, bits_per_weight: float, weight_bytes: int,
           quantized_layers: int, quantize_seconds: float, layers: tuple[dict, dict] | None = None) -> dict:
    """A result row's first columns: what the model is, before its scores."""
    result = {"format": label, "block_size": block_size, "double_quant": double_quant,
              "bits_per_weight": bits_per_weight, "weight_bytes": weight_bytes, "quantized_layers": quantized_layers,
              "quantize_seconds": quantize_seconds}
    if layers is not None:
        result["layer_formats"], result["fallbacks"] = layers
    return result


def _report(info: ModelInfo, evaluation: Evaluation, reference_bytes: int, results: list[dict]) -> dict:
    return {
        "lowbit_version": __version__,
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": library_versions(),
        "model": asdict(info),
        "protocol": evaluation.protocol_dict,
        "reference": {"weight_bytes": reference_bytes, **evaluation.reference_scores()},
        "results": results,
    }


def library_versions() -> dict[str, str]:
    """The versions a result depends on: Python, torch, transformers, numpy and the model loaders'."""
    versions = {"python": platform.python_version(), "lowbit": __version__}
    for name in ("torch", "transformers", "numpy", "safetensors", "gguf"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def materialize(model: nn.Module) -> nn.Module:
    """Keep every QuantLinear's dequantized weight (fast scoring; the model then holds fp32 bytes again)."""
    for module in model.modules():
        if isinstance(module, QuantLinear):
            module.materialize()
    return model


def report_block(model: nn.Module) -> int | None:
    return next((m.qweight.block_size for m in model.modules() if isinstance(m, QuantLinear)), None)
