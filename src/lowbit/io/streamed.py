"""A model quantized without calibration and written as it is read, tensor by tensor: the model is never held.

``quantize_to_directory`` writes what ``quantize_model`` then ``io.model_io.save_quantized`` write, byte for byte
(tests/models/test_lazy.py), from a model built on the meta device (``lowbit.models.lazy``): each layer's weight is
read, rounded and handed to the shard writer (``lowbit.files.shards``), then each other tensor. Before it starts,
the output's size is checked against the free disk.

Each full shard goes to ``OUT.partial`` (``lowbit.files.partial``) with what lowbit.json will say of the layers
rounded so far; a run killed at any point, or stopped by a full disk, continues from its last finished shard
(``resume``) and writes the bytes an uninterrupted run writes (tests/io/test_resume.py). A calibrated plan, written
block by block, continues from the end of the last block whose layers are all in finished shards: with each shard
goes the calibration pass's state at that block's end (``lowbit.workflows.run.Boundary``: each stream's hidden
states, what the methods gathered, the walked blocks' norms as they left them), and the blocks before it are
neither read nor run again.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import asdict, fields

import torch

from .. import __version__
from ..cachedir import CacheSpaceError, check_space, free_disk
from ..calibration.carry import put_parameters
from ..cluster.pool import SERIAL, Pool
from ..errors import InputError
from ..files.partial import Partial, ProducerState
from ..files.shards import SHARD_BYTES, ShardWriter
from ..formats.facts import stored_bits
from ..formats.registry import get_format
from ..layers.linear import QuantLinear
from ..layers.surgery import QuantizeReport, plan_layers, quantize_model
from ..models.lazy import LazyWeights
from ..models.loader import ModelInfo
from ..planning.plan import QuantPlan
from ..progress import progress_bar
from ..workflows.run import Boundary, Calibration, run
from .model_io import check_output, local_source, quantized_meta, stored_layer, write_model_files, writing_output

_HINT = "free some space, or write it elsewhere with -o"
# layers a quantize_model call: each call checks the whole plan first (a zero row rounded per format and width),
# 12 ms on SmolLM2 (nf4, its 210 layers in 210 calls: 6.0 s, in one call: 3.5 s, a loaded machine); 8 a call keep
# that to a few percent (synthetic 1b, nf4: 8.8 s against 8.6 s in one call), and a resume rounds at most 8 again
_LAYERS_A_CALL = 8


def quantize_to_directory(model, weights: LazyWeights, tokenizer, info: ModelInfo, plan: QuantPlan, directory, *,
                          overwrite=False, resume=False, keep_dtype: torch.dtype = torch.float32,
                          shard_bytes: int = SHARD_BYTES, progress: bool = True,
                          calibration: Calibration | None = None,
                          on_layer: Callable[[str, QuantLinear], None] | None = None,
                          pool: Pool = SERIAL) -> QuantizeReport:
    """Quantize a model built on the meta device (``lowbit.models.lazy.load_lazily``) as ``plan`` says and write
    it to ``directory`` as ``save_quantized`` would, tensor by tensor: each layer's weight is read, rounded and
    handed to the shard writer, then each other tensor, so memory holds one float weight and one shard, never the
    model. The files are the ones ``quantize_model`` then ``save_quantized`` write (tests/models/test_lazy.py).
    ``resume``: go on from the finished shards an interrupted run with the same settings (``resume_settings``)
    left in ``OUT.partial``; without it they are refused, or discarded with ``overwrite``.

    ``calibration``: the inputs of a plan that calibrates; its methods run block by block as each block is read
    (``lowbit.workflows.run.streamed``), and each block's layers are written once it is done, so memory holds one
    block (tests/workflows/test_streamed_run.py). ``resume`` goes on from the end of the last block whose layers
    are all in finished shards; the calibration settings must be the same too. ``on_layer(name, layer)``: each
    quantized layer as it is written (a calibrated plan's block is still in memory then). ``pool``: where the
    layers are rounded, and one block's layers worked on (``lowbit.cluster.pool``); the driver writes every byte,
    in the same order, so the files are the same."""
    out = check_output(directory, overwrite=overwrite, source=local_source(info.source))
    if plan.needs_calibration and calibration is None:
        raise InputError(f"{plan.label} needs calibration inputs: pass calibration=")
    need = output_bytes(model, plan, keep_dtype)
    settings = resume_settings(info, plan, keep_dtype, shard_bytes, calibration if plan.needs_calibration else None)
    with Partial.open(out, settings, resume=resume, overwrite=overwrite) as partial:
        check_space("the quantized model", disk=need - partial.stored_bytes, memory=0,
                    directory=out.absolute().parent, hint=_HINT)
        try:
            report = _write(model, weights, tokenizer, info, plan, directory, partial, overwrite=overwrite,
                            keep_dtype=keep_dtype, shard_bytes=shard_bytes, progress=progress,
                            calibration=calibration, on_layer=on_layer, pool=pool)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise _disk_full(e, out, partial, need) from e
        partial.remove()
    return report


def resume_settings(info: ModelInfo, plan: QuantPlan, keep_dtype: torch.dtype, shard_bytes: int,
                    calibration: Calibration | None = None) -> dict:
    """What decides the bytes of a streamed quantize, by the names a user knows them by: a resumed run must have
    all of them as the run it continues (versions too: another torch may round a tie otherwise); with
    ``calibration`` (a plan that calibrates), its inputs' too (``Calibration.settings``)."""
    import safetensors

    return {"--model": info.source, "the model's files' sha256": info.file_hash, "the model's kind": info.kind,
            "the model's name": info.name, "--format/--plan": plan.label, "the plan's rules": plan.to_dict(),
            "--keep-dtype": str(keep_dtype).removeprefix("torch."), "--shard-size": shard_bytes,
            "lowbit": __version__, "torch": torch.__version__, "safetensors": safetensors.__version__,
            **(calibration.settings(plan) if calibration is not None else {})}


def _write(model, weights: LazyWeights, tokenizer, info: ModelInfo, plan: QuantPlan, directory, partial: Partial, *,
           overwrite: bool, keep_dtype: torch.dtype, shard_bytes: int, progress: bool,
           calibration: Calibration | None, on_layer: Callable | None, pool: Pool) -> QuantizeReport:
    """The layers rounded a few at a time (``quantize_model(only=)``), their parts and then every other tensor
    handed to the writer, a boundary after each tensor (a shard ends where an uninterrupted run ends it). The
    state at a boundary is what lowbit.json will say of the layers rounded before it: ``{"parts": [{"layers":
    {name: lowbit.json entry}, "report": QuantizeReport}]}``, one part per call. A resumed run rounds what its
    state lacks: a part again, if a shard ended among its tensors (the writer checks those it holds against the
    new ones).

    A calibrated plan is one part, made block by block (``lowbit.workflows.run.streamed``). Until it is done, the
    state at a boundary is the pass's at the end of the last block whose layers were all handed over before it:
    ``{"parts": [], "pass": {"engine", "reports", "seconds", "layers"}}`` and the pass's tensors (a resumed run
    goes on from that block, its layers' entries and reports kept); once it is, the one part, with the
    parameters the pass left in memory (the norms, as ``+awq`` folded them), which a resumed run puts back."""
    with writing_output(directory, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, shard_bytes, partial=partial, boundaries=True)
        state = writer.resumed or ProducerState(info={"parts": []})
        done = {name for part in state.info["parts"] for name in part["layers"]}
        todo = [names[0] for names, _, _, _ in plan_layers(model, plan) if names[0] not in done]
        uniform = plan.uniform_config
        what = uniform.format_name if uniform is not None else plan.label  # quantize_model's own bar's words
        entries: dict[str, dict] = {}

        def write_layer(names, layer, config, wanted) -> None:
            entries[names[0]], stored = stored_layer(names[0], layer, config.label, wanted)
            if on_layer is not None:
                on_layer(names[0], layer)
            for key, t in stored.items():
                writer.add(key, t)
                writer.boundary(state)  # a shard ending here is followed by this part made again

        if plan.needs_calibration and state.info["parts"]:  # the pass was done: its changes put back
            put_parameters(model, state.tensors)
            todo = []
        elif plan.needs_calibration:  # block by block, written as each block is done
            walked = state.info.get("pass")  # None: from the start

            def at_block(boundary: Boundary) -> None:
                nonlocal state
                state = ProducerState(boundary.state.tensors, {"parts": [], "pass": {
                    "engine": boundary.state.info, "reports": [asdict(r) for r in boundary.parts],
                    "seconds": boundary.seconds, "layers": dict(entries)}})
                writer.boundary(state)

            resumed = None
            if walked is not None:
                entries.update(walked["layers"])
                resumed = Boundary(ProducerState(state.tensors, walked["engine"]),
                                   tuple(_report(r) for r in walked["reports"]), walked["seconds"])
            rounded = run(model, plan, calibration, progress=progress, source=weights, sink=write_layer,
                          resumed=resumed, at_boundary=at_block, pool=pool)
            packed = {f"{name}.weight" for name in rounded.layers}
            held = {n: p.detach() for n, p in model.named_parameters() if not p.is_meta and n not in packed}
            state = ProducerState(held, {"parts": [{"layers": dict(entries), "report": asdict(rounded)}]})
            writer.boundary(state)
            todo = []
        with progress_bar(len(todo), f"quantizing to {what}", enabled=progress) as advance:
            step = max(_LAYERS_A_CALL, pool.in_flight)  # on a cluster, every task slot busy
            for start in range(0, len(todo), step):
                only = todo[start:start + step]
                rounded = quantize_model(model, plan, progress=False, source=weights, sink=write_layer, only=only,
                                         pool=pool)
                part = {"layers": dict(entries), "report": asdict(rounded)}
                state = ProducerState(info={"parts": [*state.info["parts"], part]})
                writer.boundary(state)
                entries.clear()
                for _ in only:
                    advance()
        report = QuantizeReport.combine([_report(part["report"]) for part in state.info["parts"]])
        swapped = {f"{name}.weight" for name in report.layers}
        tied, first_of, saved = {}, {}, 0
        for key, t in model.state_dict(keep_vars=True).items():
            if key in swapped:
                continue  # a quantized layer's weight, stored packed above (a tied head's embedding stays)
            if id(t) in first_of:  # a tied tensor, stored once
                tied[key] = first_of[id(t)]
                continue
            first_of[id(t)] = key
            if t.is_floating_point() and t.dtype != keep_dtype:
                saved += t.numel() * (t.element_size() - keep_dtype.itemsize)
            if key in writer.finished:
                continue  # written before the run was stopped
            value = weights.read(key, keep_dtype) if t.is_meta else t.detach()
            writer.add(key, value.to(keep_dtype) if value.is_floating_point() else value)
            writer.boundary(state)
            del value
        layers = {name: entry for part in state.info["parts"] for name, entry in part["layers"].items()}
        meta = quantized_meta(info, plan, keep_dtype, report, report.model_bytes_after - saved, layers, tied)
        writer.close()
        write_model_files(tmp, model, tokenizer, meta)
    return report


def _report(saved: dict) -> QuantizeReport:
    """A report as its ``asdict`` went through JSON: the lists are the report's tuples again."""
    def tuples(v):
        return tuple(map(tuples, v)) if isinstance(v, list) else v

    return QuantizeReport(**{f.name: tuples(saved[f.name]) for f in fields(QuantizeReport)})


def _disk_full(e: OSError, out, partial: Partial, need: int) -> CacheSpaceError:
    """A full disk mid-run, said in one line: what the output still needs, what is free, and how to go on."""
    left, free = max(need - partial.stored_bytes, 0), free_disk(partial.directory.parent)
    kept = len(partial.shards)
    then = (f"its {kept} finished shards stay in {partial.directory}: free some space and run the same command with "
            "--resume to continue") if kept else "no shard was finished: free some space and run it again"
    return CacheSpaceError(f"the disk filled while writing {out} ({e.strerror or errno.errorcode[e.errno]}): about "
                           f"{_mb(left)} more needed, {_mb(free)} free; {then}", e.errno)


def _mb(n: int) -> str:
    return f"{n / 1e6:,.1f} MB"


# safetensors headers (tens of kB a shard), the index, config, tokenizer and lowbit.json: a generous bound
_FILES_BESIDE = 64 << 20


def output_bytes(model, plan: QuantPlan, keep_dtype: torch.dtype) -> int:
    """About what ``model`` quantized as ``plan`` says stores: each layer's packed weight as its format's facts
    count it (``formats.facts.stored_bits``), every other tensor once, at ``keep_dtype``. Checked against the
    free disk before a streamed run starts, so that it does not fail an hour in."""
    targets = plan_layers(model, plan)
    swapped = {f"{n}.weight" for names, _, _, _ in targets for n in names}
    total, seen = 0, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in swapped and id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * (keep_dtype.itemsize if t.is_floating_point() else t.element_size())
    for _, linear, config, _ in targets:
        out_f, in_f = linear.weight.shape
        block = in_f if any(m.row_blocks for m in config.method_classes) else \
            config.block_size or get_format(config.format).default_block_size
        total += stored_bits(get_format(config.format).name, out_f * in_f, block,
                             double_quant=config.double_quant) // 8
        total += in_f if config.layer_signs("", in_f) is not None else 0
    return total + _FILES_BESIDE
