"""workflows.run on a model read block by block (``streamed``): the layers and the tensors beside them are the ones
the model read whole gives, to the bit, and only one block's linear weights are ever read in at a time."""

import pytest
import torch

from lowbit.io.model_io import stored_layer
from lowbit.layers.surgery import plan_layers
from lowbit.models import load_model
from lowbit.models.lazy import load_lazily
from lowbit.planning import QuantPlan
from lowbit.workflows.run import Calibration, run

PROTOCOL = {"window": 64, "scored": 1}
LABELS = ("nf4@amse", "nf4/32+dq+had+gptq@amse", "nf4/32+dq+awq+gptq@amse", "lloyd4/32+dq+gptq+cb@amse",
          "nf4/32+dq+awq@amse", "int4/64+gptq")


def calibration(tokenizer, info, count=2) -> Calibration:
    return Calibration(tokenizer, info.kind, count=count, progress=False, **PROTOCOL)


def whole(spec, plan) -> tuple[dict, dict]:
    """``(layers, other tensors)``: what ``plan`` stores for the model read whole."""
    model, tokenizer, info = load_model(spec)
    layers = {}
    report = run(model, plan, calibration(tokenizer, info), progress=False,
                 sink=lambda names, layer, config, wanted: layers.update(
                     {names[0]: stored_layer(names[0], layer, config.label, wanted)}))
    swapped = {f"{n}.weight" for n in report.layers}
    return layers, {k: t for k, t in model.state_dict().items() if k not in swapped}, report


def streamed(spec, plan) -> tuple[dict, dict]:
    """The same for the model read block by block; asserts that at most one block's linear weights are read in
    when a layer is handed over."""
    model, tokenizer, info, weights = load_lazily(spec)
    linears = {names[0]: linear for names, linear, _, _ in plan_layers(model, plan)}
    layers = {}

    def sink(names, layer, config, wanted):
        read = {n.split(".self_attn.")[0].split(".mlp.")[0] for n, m in linears.items() if not m.weight.is_meta}
        assert len(read) <= 1, read  # one block's linear weights at most
        layers[names[0]] = stored_layer(names[0], layer, config.label, wanted)

    report = run(model, plan, calibration(tokenizer, info), progress=False, source=weights, sink=sink)
    assert all(m.weight.is_meta for m in linears.values())  # each released after its block
    swapped = {f"{n}.weight" for n in report.layers}
    return layers, {k: weights.read(k) if t.is_meta else t for k, t in model.state_dict().items()
                    if k not in swapped}, report


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(same(a[k], b[k]) if isinstance(a[k], dict) else
                                        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else
                                        (len(a[k]) == len(b[k]) and all(
                                            same(x, y) if isinstance(x, dict) else x == y
                                            for x, y in zip(a[k], b[k], strict=True)))
                                        if isinstance(a[k], tuple) else a[k] == b[k] for k in a)


@pytest.mark.parametrize("label", LABELS)
def test_a_model_read_block_by_block_stores_the_same_layers(label, tiny_lm_dir):
    plan = QuantPlan.uniform(label)
    layers, others, report = whole(str(tiny_lm_dir), plan)
    s_layers, s_others, s_report = streamed(str(tiny_lm_dir), plan)
    assert list(s_layers) == list(layers) and same(s_layers, layers)
    assert same(s_others, others)  # AWQ's folds into the norms included
    assert s_report.layers == report.layers and s_report.layer_bytes_after == report.layer_bytes_after
    assert s_report.model_bytes_after == report.model_bytes_after


@pytest.mark.slow  # two GPTQ passes over SmolLM2: minutes on 2 cores (the tiny model above checks every label)
def test_smollm2_read_block_by_block_stores_the_same_layers(smollm2):
    plan = QuantPlan.uniform("nf4/32+dq+had+gptq@amse")
    layers, others, _ = whole("smollm2", plan)
    s_layers, s_others, _ = streamed("smollm2", plan)
    assert same(s_layers, layers) and same(s_others, others)


@pytest.mark.parametrize("label", ["nf4/32+dq+awq+gptq@amse", "nf4@amse"])
def test_a_calibrated_plan_streamed_to_files_writes_what_save_quantized_writes(label, tiny_lm_dir, tmp_path):
    from lowbit.io.model_io import save_quantized
    from lowbit.io.streamed import quantize_to_directory

    from ..models.test_lazy import read_back

    plan = QuantPlan.uniform(label)
    model, tokenizer, info = load_model(str(tiny_lm_dir))
    report = run(model, plan, calibration(tokenizer, info), progress=False)
    save_quantized(model, tokenizer, info, report, plan, tmp_path / "whole")
    lazy, tokenizer, info, weights = load_lazily(str(tiny_lm_dir))
    quantize_to_directory(lazy, weights, tokenizer, info, plan, tmp_path / "streamed", progress=False,
                          calibration=calibration(tokenizer, info))
    assert read_back(tmp_path / "streamed") == read_back(tmp_path / "whole")


def roundtrip(boundary):
    """A ``Boundary`` as a resumed run gets it back: its tensors through safetensors, its JSON through json."""
    import json

    from safetensors.torch import load, save

    from lowbit.files.partial import ProducerState
    from lowbit.workflows.run import Boundary

    tensors = load(save({k: t.clone() for k, t in boundary.state.tensors.items()}))  # +awq's scales share memory
    state = ProducerState(tensors, json.loads(json.dumps(boundary.state.info)))
    return Boundary(state, boundary.parts, boundary.seconds)


@pytest.mark.parametrize("label", ["nf4/32+dq+awq@amse", "nf4/32+dq+had+gptq@amse"])
def test_a_run_continued_from_a_blocks_end_reads_no_block_before_it(label, tiny_lm_dir):
    """Continued from the end of block 0, the run reads nothing of block 0 (not its linear weights, not its norms:
    those +awq folded come with the boundary) and stores what the uninterrupted run stores after it."""
    plan = QuantPlan.uniform(label)
    first, tokenizer, info, weights = load_lazily(str(tiny_lm_dir))
    layers, boundaries = {}, []
    report = run(first, plan, calibration(tokenizer, info), progress=False, source=weights,
                 sink=lambda names, layer, config, wanted: layers.update(
                     {names[0]: stored_layer(names[0], layer, config.label, wanted)}),
                 at_boundary=lambda b: boundaries.append(roundtrip(b)))
    assert [b.state.info["blocks"] for b in boundaries] == [1, 2]
    model, tokenizer, info, weights = load_lazily(str(tiny_lm_dir))
    read, reader = [], weights.read
    weights.read = lambda name, *a, **k: read.append(name) or reader(name, *a, **k)
    again = {}
    resumed = run(model, plan, calibration(tokenizer, info), progress=False, source=weights,
                  sink=lambda names, layer, config, wanted: again.update(
                      {names[0]: stored_layer(names[0], layer, config.label, wanted)}),
                  resumed=boundaries[0])
    assert read and not [n for n in read if n.startswith("model.layers.0.")]
    assert list(again) == [n for n in layers if not n.startswith("model.layers.0.")]
    assert same(again, {n: layers[n] for n in again})
    assert resumed.layers == report.layers and resumed.layer_bytes_after == report.layer_bytes_after
    in_blocks = {k: t for k, t in model.state_dict().items() if k.startswith("model.layers.") and "norm" in k}
    assert len(in_blocks) == 4 and same(in_blocks, {k: first.state_dict()[k] for k in in_blocks})  # +awq's folds
