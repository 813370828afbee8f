"""Searched formats through the commands: calibration split, saved and reloaded, one-line refusals."""

import json

import pytest
import torch

from lowbit.io import load_quantized
from lowbit.layers import QuantLinear

from .helpers import assert_one_line_error, lowbit, run_main

TINY = ["--window", "64", "--windows", "1"]


def test_compare_with_searched_formats(tiny_lm_dir, tmp_path):
    out = tmp_path / "r.json"
    r = lowbit("compare", "--model", tiny_lm_dir, "--formats", "nf4,nf4@mse,nf4@amse,int4_asym@hqq", *TINY,
               "--calibrate", "2", "--json", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    rows = {row["format"]: row for row in report["results"]}
    assert set(rows) == {"nf4", "nf4@mse", "nf4@amse", "int4_asym@hqq"}
    assert report["calibration"]["windows"] == 2
    assert rows["nf4@amse"]["quantize_seconds"] >= report["calibration"]["seconds"]
    assert rows["nf4@mse"]["bits_per_weight"] == rows["nf4"]["bits_per_weight"]


@pytest.mark.parametrize(("label", "search"), [("nf4@amse", "amse"), ("int4_asym@ahqq", "ahqq")])
def test_quantize_searched_saves_and_reloads(tiny_lm_dir, tmp_path, label, search, capsys):
    out = tmp_path / "q"
    r = run_main(capsys, "quantize", "--model", tiny_lm_dir, "--format", label, "--calibrate", "2", "--window", "64",
                 "--windows", "1", "-o", out)
    assert r.returncode == 0, r.stderr
    model, _, meta = load_quantized(out)
    assert meta["config"]["search"] == search and meta["config"]["label"] == label
    parts = [m.qweight.parts for m in model.modules() if isinstance(m, QuantLinear)]
    zeros = [p["zeros"] for p in parts if "zeros" in p]
    assert all(z.dtype == torch.float16 for z in zeros) and len(zeros) == (search == "ahqq") * len(meta["layers"])
    r = run_main(capsys, "eval", out, *TINY)
    assert r.returncode == 0, r.stderr
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()


def test_calibration_text_too_short_writes_nothing(tiny_lm_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("a few words only, " * 40)
    out = tmp_path / "r.json"
    r = lowbit("compare", "--model", tiny_lm_dir, "--formats", "nf4@amse", "--text", text, "--window", "64",
               "--windows", "1", "--calibrate", "500", "--json", out)
    assert_one_line_error(r, "--calibrate")
    assert not out.exists()


def test_search_refusals_are_one_line(tiny_lm_dir, tmp_path):
    assert_one_line_error(lowbit("compare", "--model", tiny_lm_dir, "--formats", "nf4@fast", *TINY),
                          "unknown scale search")
    assert_one_line_error(lowbit("compare", "--model", tiny_lm_dir, "--formats", "q4_k@mse", *TINY), "grid")
    assert_one_line_error(lowbit("quantize", "--model", tiny_lm_dir, "--format", "nf4@hqq", "-o", tmp_path / "q"),
                          "zero point", "int4_asym")
    assert_one_line_error(lowbit("compare", "--model", tiny_lm_dir, "--formats", "nf4@mse", "--calibrate", "4",
                                 *TINY), "no format asks")
    assert_one_line_error(lowbit("compare", "--model", tiny_lm_dir, "--formats", "nf4@amse", "--calibrate", "0",
                                 *TINY), "--calibrate: must be a whole number from 1")
    assert not (tmp_path / "q").exists()
