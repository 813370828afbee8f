"""+awq through the commands: the folded norms are saved with the model, reloaded, and the model scores."""

import torch

from lowbit.io import load_quantized
from lowbit.models.loader import load_model

from .helpers import assert_one_line_error
from .helpers import run_main as run

TINY = ["--window", "64", "--windows", "1"]


def test_quantize_with_awq_saves_the_folded_norms(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "awq"
    r = run(capsys, "quantize", "--model", tiny_lm_dir, "--format", "int4/32+awq", "--calibrate", "2", *TINY,
            "-o", out)
    assert r.returncode == 0, r.stderr
    model, _, meta = load_quantized(out)
    assert meta["config"]["label"] == "int4/32+awq"
    original = load_model(str(tiny_lm_dir))[0]
    norm = "model.layers.0.input_layernorm.weight"
    assert not torch.equal(model.state_dict()[norm], original.state_dict()[norm])  # the scales live in the norm
    r = run(capsys, "eval", out, *TINY)
    assert r.returncode == 0, r.stderr


def test_awq_is_no_candidate_for_a_budget_or_lowbit_errors(tiny_lm_dir, tmp_path, capsys):
    assert_one_line_error(run(capsys, "quantize", "--model", tiny_lm_dir, "--budget", "4.5", "--candidates",
                              "int4,int8+awq", "-o", tmp_path / "b"), "cannot be one layer's candidate")
    assert_one_line_error(run(capsys, "errors", "--model", tiny_lm_dir, "--formats", "int4+awq"),
                          "score them with lowbit compare")
    assert not (tmp_path / "b").exists()
