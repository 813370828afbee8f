"""A model quantized without calibration and written as it is read, tensor by tensor: the model is never held.

``quantize_to_directory`` writes what ``quantize_model`` then ``io.model_io.save_quantized`` write, byte for byte
(tests/models/test_lazy.py), from a model built on the meta device (``lowbit.models.lazy``): each layer's weight is
read, rounded and handed to the shard writer (``lowbit.files.shards``), then each other tensor. Before it starts,
the output's size is checked against the free disk.
"""

from __future__ import annotations

import torch

from ..cachedir import check_space
from ..errors import InputError
from ..files.shards import SHARD_BYTES, ShardWriter
from ..formats.facts import stored_bits
from ..formats.registry import get_format
from ..layers.surgery import QuantizeReport, plan_layers, quantize_model
from ..models.lazy import LazyWeights
from ..models.loader import ModelInfo
from ..planning.plan import QuantPlan
from .model_io import check_output, local_source, quantized_meta, stored_layer, write_model_files, writing_output


def quantize_to_directory(model, weights: LazyWeights, tokenizer, info: ModelInfo, plan: QuantPlan, directory, *,
                          overwrite=False, keep_dtype: torch.dtype = torch.float32, shard_bytes: int = SHARD_BYTES,
                          progress: bool = True) -> QuantizeReport:
    """Quantize a model built on the meta device (``lowbit.models.lazy.load_lazily``) as ``plan`` says (no
    calibration) and write it to ``directory`` as ``save_quantized`` would, tensor by tensor: each layer's weight
    is read, rounded and handed to the shard writer, then each other tensor, so memory holds one float weight and
    one shard, never the model. The files are the ones ``quantize_model`` then ``save_quantized`` write
    (tests/models/test_lazy.py)."""
    out = check_output(directory, overwrite=overwrite, source=local_source(info.source))
    if plan.needs_calibration:
        raise InputError(f"{plan.label} needs calibration, which runs the whole model: load it with load_model")
    check_space("the quantized model", disk=output_bytes(model, plan, keep_dtype), memory=0,
                directory=out.absolute().parent, hint="free some space, or write it elsewhere with -o")
    layers: dict[str, dict] = {}
    with writing_output(directory, overwrite=overwrite) as tmp:
        writer = ShardWriter(tmp, shard_bytes)

        def write_layer(names, layer, config, wanted) -> None:
            layers[names[0]], stored = stored_layer(names[0], layer, config.label, wanted)
            for key, t in stored.items():
                writer.add(key, t)

        report = quantize_model(model, plan, progress=progress, source=weights, sink=write_layer)
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
            value = weights.read(key, keep_dtype) if t.is_meta else t.detach()
            writer.add(key, value.to(keep_dtype) if value.is_floating_point() else value)
            del value
        meta = quantized_meta(info, plan, keep_dtype, report, report.model_bytes_after - saved, layers, tied)
        writer.close()
        write_model_files(tmp, model, tokenizer, meta)
    return report


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
