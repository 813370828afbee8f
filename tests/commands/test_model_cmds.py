"""lowbit quantize, compare and eval together (a saved model scores what compare scored; LLM.int8() through all
three), and the one-line errors (exit status 2) they share."""

import json
import os

import pytest

from lowbit.cli import main

from .helpers import assert_one_line_error, lowbit


def test_quantize_then_eval_round_trip(tiny_lm_dir, tmp_path):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "nf4", "--double-quant", "-o", str(q)]) == 0
    args = ["--window", "64", "--windows", "2"]
    assert main(["compare", "--model", str(tiny_lm_dir), "--formats", "nf4+dq", *args, "--json",
                 str(tmp_path / "c.json")]) == 0
    assert main(["eval", str(q), *args, "--json", str(tmp_path / "e.json")]) == 0
    compared = json.loads((tmp_path / "c.json").read_text())["results"][0]
    evaluated = json.loads((tmp_path / "e.json").read_text())["results"][0]
    for key in ("bits_per_weight", "weight_bytes", "ppl", "kl_mean", "kl_p99", "kl_max", "top1"):
        assert evaluated[key] == compared[key], key  # same numbers, whether saved and reloaded or not


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    assert_one_line_error(lowbit("quantize", "--model", bad, "--format", "nf4", "-o", tmp_path / "q"),
                          "cannot load model")
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]


def test_unknown_format(tmp_path):
    assert_one_line_error(lowbit("compare", "--formats", "nf4,nf44", "--json", tmp_path / "o.json"), "did you mean nf4")
    assert_one_line_error(lowbit("quantize", "--format", "q4_k_m", "-o", tmp_path / "q"), "unknown format")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["missing-parent", "is-a-file"])
def test_unwritable_output(tmp_path, where):
    (tmp_path / "file").write_text("")
    target = tmp_path / "no" / "dir" if where == "missing-parent" else tmp_path / "file"
    assert_one_line_error(lowbit("quantize", "--format", "nf4", "-o", target), str(target.parent if
                          where == "missing-parent" else target))
    r = lowbit("compare", "--formats", "nf4", "--json", tmp_path / "no" / "out.json")
    assert_one_line_error(r, "does not exist")
    assert os.listdir(tmp_path) == ["file"]


def test_llm_int8_through_quantize_compare_and_eval(tiny_lm_dir, tmp_path, capsys):
    """int8_outlier is a format like the others: the same numbers saved and reloaded, and the float path's share."""
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "int8_outlier/0.5", "-o", str(q)]) == 0
    args = ["--window", "64", "--windows", "2"]
    assert main(["compare", "--model", str(tiny_lm_dir), "--formats", "int8_outlier/0.5,int8", *args, "--json",
                 str(tmp_path / "c.json")]) == 0
    assert "int8_outlier/0.5: " in capsys.readouterr().out
    assert main(["eval", str(q), *args, "--json", str(tmp_path / "e.json")]) == 0
    assert "took the float path" in capsys.readouterr().out
    compared = json.loads((tmp_path / "c.json").read_text())["results"]
    evaluated = json.loads((tmp_path / "e.json").read_text())["results"][0]
    assert "float_path_share" not in compared[1]
    for key in ("bits_per_weight", "weight_bytes", "kl_mean", "top1", "float_path_share"):
        assert evaluated[key] == compared[0][key], key
    assert 0 < evaluated["float_path_share"] < 1 and evaluated["format"] == "int8_outlier/0.5"
    r = lowbit("quantize", "--model", tiny_lm_dir, "--format", "int8_outlier", "--block-size", "64", "-o",
               tmp_path / "r")
    assert_one_line_error(r, "cannot take a block size")
