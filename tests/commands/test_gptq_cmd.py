"""GPTQ through the commands: +gptq / --method gptq, saved, reloaded and scored; compare rows."""

import json

import pytest
import torch

from lowbit import quantize as quantize_tensor
from lowbit.io import load_quantized
from lowbit.layers.linear import QuantLinear
from lowbit.models.loader import load_model

from .helpers import assert_one_line_error, lowbit
from .helpers import run_main as run

TINY = ["--window", "64", "--windows", "1"]


def test_quantize_method_gptq_saves_reloads_and_scores(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "q"
    r = run(capsys, "quantize", "--model", tiny_lm_dir, "--format", "int4/32", "--method", "gptq", "--calibrate", "2",
               *TINY, "-o", out)
    assert r.returncode == 0, r.stderr
    model, _, meta = load_quantized(out)
    assert meta["config"]["label"] == "int4/32+gptq" and meta["plan"]["rules"][-1]["format"] == "int4/32+gptq"
    r = run(capsys, "eval", out, *TINY)
    assert r.returncode == 0, r.stderr


def test_refit_codebooks_are_saved_and_reloaded(tiny_lm_dir, tmp_path, capsys):
    """+cb: the stored codebook is the refit one, not the format's own fit, and the reloaded model scores."""
    out = tmp_path / "cb"
    r = run(capsys, "quantize", "--model", tiny_lm_dir, "--format", "lloyd3/32+dq+gptq+cb", "--calibrate", "2",
            *TINY, "-o", out)
    assert r.returncode == 0, r.stderr
    model, _, meta = load_quantized(out)
    assert meta["config"]["label"] == "lloyd3/32+dq+gptq+cb"
    original = load_model(str(tiny_lm_dir))[0]
    name, layer = next((n, m) for n, m in model.named_modules() if isinstance(m, QuantLinear))
    own_fit = quantize_tensor(original.get_submodule(name).weight.detach(), "lloyd3", block_size=32)
    assert not torch.equal(layer.qweight.parts["tensor_codebook"], own_fit.parts["tensor_codebook"])
    r = run(capsys, "eval", out, *TINY)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow  # two rows scored by a subprocess: ~45 s
def test_compare_gptq_beats_rounding_on_the_tiny_model(tiny_lm_dir, tmp_path):
    out = tmp_path / "r.json"
    r = lowbit("compare", "--model", tiny_lm_dir, "--formats", "int3/32,int3/32+gptq", "--calibrate", "4",
               "--window", "64", "--windows", "4", "--json", out)
    assert r.returncode == 0, r.stderr
    rows = {row["format"]: row for row in json.loads(out.read_text())["results"]}
    assert rows["int3/32+gptq"]["bits_per_weight"] == rows["int3/32"]["bits_per_weight"]
    assert rows["int3/32+gptq"]["kl_mean"] < rows["int3/32"]["kl_mean"]


def test_gptq_refusals(tiny_lm_dir, tmp_path, capsys):
    model = ["quantize", "--model", tiny_lm_dir]
    assert_one_line_error(run(capsys, *model, "--format", "q4_0+gptq", "-o", tmp_path / "a"), "levels on a grid")
    assert_one_line_error(run(capsys, *model, "--format", "int4_asym+dq", "--method", "gptq", "-o", tmp_path / "b"),
                          "double")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_interrupted_gptq_run_writes_nothing(tiny_lm_dir, tmp_path, monkeypatch):
    """Ctrl-C on the third layer of GPTQ: exit 130, no output directory, no temp directory beside it."""
    import os

    import lowbit.methods.gptq_model as gptq_model
    from lowbit.cli import main

    real, calls = gptq_model.gptq_quantize, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(gptq_model, "gptq_quantize", interrupted)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "int4/32+gptq", "--calibrate", "2", *TINY,
                 "-o", str(out / "q")]) == 130
    assert len(calls) == 3 and os.listdir(out) == []
