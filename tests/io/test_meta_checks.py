"""Issue 25, finding 14: every field of lowbit.json that lowbit reads is checked; an edited file is
refused in one line naming the field (it loaded as something else before)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from lowbit import load_model, quantize_model
from lowbit.errors import ModelLoadError
from lowbit.formats.registry import formats, get_format
from lowbit.io import load_quantized, save_quantized
from lowbit.planning import QuantPlan
from lowbit.quantize import quantize

LAYER = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def saved(tiny_lm_dir, tmp_path_factory):
    model, tokenizer, info = load_model(tiny_lm_dir)
    plan = QuantPlan.uniform("nf4")
    report = quantize_model(model, plan, progress=False)
    return save_quantized(model, tokenizer, info, report, plan, tmp_path_factory.mktemp("saved") / "q")


def edited(saved, tmp_path, edit):
    out = tmp_path / "edited"
    shutil.copytree(saved, out)
    meta = json.loads((out / "lowbit.json").read_text())
    edit(meta)
    (out / "lowbit.json").write_text(json.dumps(meta))
    return out


def layer(**fields):
    return lambda meta: meta["layers"][LAYER].update(fields)


def model(**fields):
    return lambda meta: meta["model"].update(fields)


CASES = [
    (layer(format="bogus"), f"layers.{LAYER}.format must be 'nf4', the name of format id"),  # an unknown name
    (layer(format="int8"), f"layers.{LAYER}.format must be 'nf4'"),  # a swapped name
    (layer(format_id=9999), f"layers.{LAYER}.format_id must be a format id this lowbit knows"),
    (layer(format_id="4"), f"layers.{LAYER}.format_id must be a whole number"),
    (layer(double_quant="yes"), f"layers.{LAYER}.double_quant must be true or false, not 'yes'"),
    (layer(shape=[-64, 64]), f"layers.{LAYER}.shape must be a whole number >= 1"),
    (layer(shape=[64]), f"layers.{LAYER}.shape must be [rows, columns]"),
    (layer(dtype="float64"), f"layers.{LAYER}.dtype must be one of float32, float16, bfloat16"),
    (layer(block_size=0), f"layers.{LAYER}.block_size must be a whole number >= 1"),
    (layer(parts="codes"), f"layers.{LAYER}.parts must be a list"),
    (layer(parts=["codes", "scales", "extra"]), f"has no tensor {LAYER}.qweight.extra"),
    (layer(block_size=32), f"{LAYER}: stored parts"),  # the parts must match the format, shape and block
    (layer(shape=[10**6, 10**6]), "has shape (1000000, 1000000), but the architecture's is (64, 64)"),
    (lambda meta: meta["config"].update(double_quant="yes"), "config.double_quant must be true or false"),
    (lambda meta: meta["config"].update(keep_dtype="int8"), "config.keep_dtype must be one of"),
    (lambda meta: meta["quantize"].update(bits_per_weight="x"), "quantize.bits_per_weight must be a finite number"),
    (model(kind="decoder"), "model.kind must be 'causal-lm' or 'encoder'"),
    (model(kind="encoder"), "says model.kind 'encoder', but config.json describes a causal-lm"),
    (model(file_hash="abc"), "model.file_hash must be 64 lowercase hex digits"),
    (model(source="../../etc/model"), "model.source must be an embedded model's name"),
    (model(source="/models/../../etc/x.gguf"), "model.source must be"),
    (model(source="models/x"), None),  # a hub id
    (model(source="smollm2"), None),
    (model(source="./x"), "model.source must be"),
    (model(source=["/x"]), "model.source must be"),
    (model(extra=1), "model must be an object of kind, source, file_hash and name"),
    (lambda meta: meta["tied"].update({"lm_head.weight": "nope"}), "tied.lm_head.weight names 'nope'"),
    (lambda meta: meta.update(files="model.safetensors"), "files must be a list of file names"),
    (lambda meta: meta.update(layers=[]), "layers must be an object"),
]


@pytest.mark.parametrize("edit,message", CASES)
def test_an_edited_lowbit_json_is_refused_naming_the_field(saved, tmp_path, edit, message):
    directory = edited(saved, tmp_path, edit)
    if message is None:
        load_quantized(directory)
        return
    with pytest.raises(ModelLoadError) as err:
        load_quantized(directory)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_cli_says_it_in_one_line(saved, tmp_path):
    directory = edited(saved, tmp_path, layer(double_quant="yes"))
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "generate", str(directory), "--prompt", "hi"],
                       capture_output=True, text=True)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr and last.startswith("lowbit generate: error:")
    assert "double_quant must be true or false, not 'yes'" in last


@pytest.mark.parametrize("name", formats())
def test_every_format_stores_at_least_its_bits_per_weight(name):
    """check_layout's allocation-free bound (numel * format.bits <= stored bits) must hold for every format."""
    q = quantize(torch.randn(64, 512), name)
    stored = sum(t.numel() * t.element_size() for t in q.parts.values())
    assert 64 * 512 * get_format(name).bits <= 8 * stored


def test_a_saved_model_is_readable_with_the_umask(saved):
    mask = os.umask(0)
    os.umask(mask)
    assert {p.stat().st_mode & 0o777 for p in saved.iterdir()} == {0o666 & ~mask}
