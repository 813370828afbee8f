"""lowbit compare / quantize / eval end to end, and their one-line errors (exit status 2)."""

import json
import os
import subprocess
import sys

import pytest

from lowbit.cli import main

KEYS = {"format", "bits_per_weight", "weight_bytes", "quantize_seconds", "ppl", "kl_mean", "kl_median", "kl_p99",
        "kl_max", "top1"}


def lowbit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def run_main(capsys, *args):
    """``lowbit`` run in this process, as a CompletedProcess: no interpreter start (~4 s) per call."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def test_compare_embedded_model_json(tmp_path, capsys):
    """The README's check, on fewer windows: the embedded SmolLM2 to nf4, int8, q4_0."""
    out = tmp_path / "out.json"
    assert main(["compare", "--formats", "nf4,int8,q4_0", "--windows", "1", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [r["format"] for r in report["results"]] == ["nf4", "int8", "q4_0"]
    for r in report["results"]:
        assert r.keys() >= KEYS and r["tokens"] == 511
    assert report["protocol"] | {} == report["protocol"] and report["protocol"]["windows"] == 1
    assert report["reference"]["ppl"] > 1 and report["model"]["name"].startswith("SmolLM2-135M")
    by = {r["format"]: r for r in report["results"]}
    assert by["int8"]["kl_mean"] < by["q4_0"]["kl_mean"] and by["int8"]["top1"] > by["nf4"]["top1"]
    assert by["nf4"]["bits_per_weight"] == by["q4_0"]["bits_per_weight"] == 4.5
    table = capsys.readouterr().out
    assert "same top-1" in table and "q4_0" in table


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


def test_eval_recomputes_a_missing_reference(tiny_lm_dir, tmp_path, monkeypatch):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "q4_0", "-o", str(q)]) == 0
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "empty-cache"))
    assert main(["eval", str(q), "--window", "64", "--windows", "1"]) == 0
    assert len(os.listdir(tmp_path / "empty-cache")) == 1


@pytest.mark.slow  # 35 s, the default protocol's 512 sentences on MiniLM
def test_minilm_compare(tmp_path):
    out = tmp_path / "m.json"
    assert main(["compare", "--model", "minilm", "--formats", "int8,nf4", "--json", str(out)]) == 0
    results = {r["format"]: r for r in json.loads(out.read_text())["results"]}
    assert 0 < results["int8"]["cos_dist_mean"] < results["nf4"]["cos_dist_mean"] < 0.05
    assert results["int8"]["sentences"] == 512


def assert_one_line_error(r, *needles):
    """Exit 2 and one error line; other stderr lines may only be progress ("lowbit: ..." without a terminal)."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and lines and " error: " in lines[-1], r.stderr
    assert all(line.startswith("lowbit: ") for line in lines[:-1]), r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


def test_missing_model_file(tmp_path):
    assert_one_line_error(lowbit("compare", "--model", tmp_path / "nope.gguf", "--windows", 1), "does not exist")


def test_corrupt_model_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(200))
    assert_one_line_error(lowbit("quantize", "--model", bad, "--format", "nf4", "-o", tmp_path / "q"),
                          "cannot load model")
    assert sorted(os.listdir(tmp_path)) == ["bad.gguf"]


def test_text_shorter_than_one_window(tiny_lm_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to hold a window.")
    r = lowbit("compare", "--model", tiny_lm_dir, "--formats", "int8", "--text", short, "--json", tmp_path / "o.json")
    assert_one_line_error(r, "fewer than one window of 512")
    assert sorted(os.listdir(tmp_path)) == ["short.txt"]


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


def test_eval_of_a_missing_or_corrupt_directory(tmp_path, tiny_lm_dir):
    assert_one_line_error(lowbit("eval", tmp_path / "nope"), "no lowbit.json")
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "int8", "-o", str(q)]) == 0
    (q / "model.safetensors").write_bytes(b"\0" * 64)
    assert_one_line_error(lowbit("eval", q, "--window", 64, "--windows", 1), "cannot load model")


def test_compare_keeps_going_past_a_format_the_model_cannot_hold(tiny_lm_dir, tmp_path, monkeypatch):
    """hidden size 64 cannot hold q4_k's 256-weight super-blocks: its row says why, nf4 is still
    scored, a repeated label runs once, and without a terminal progress is plain stderr lines."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    r = lowbit("compare", "--model", tiny_lm_dir, "--formats", "nf4,q4_k,nf4/64", "--window", 64, "--windows", 1,
               "--json", tmp_path / "o.json")
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    results = json.loads((tmp_path / "o.json").read_text())["results"]
    assert [x["format"] for x in results] == ["nf4", "q4_k"]
    assert results[0]["kl_mean"] > 0 and "q4_k needs each row to hold whole blocks of 256" in results[1]["error"]
    assert "not scored" in r.stdout and "q4_k" in r.stdout
    lines = r.stderr.splitlines()
    assert lines and all(line.startswith("lowbit: ") for line in lines), lines
    assert any("scoring nf4" in line for line in lines) and any("reference" in line for line in lines)


def test_compare_refuses_when_no_format_can_be_applied(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    r = lowbit("compare", "--model", tiny_lm_dir, "--formats", "q4_k", "--window", 64, "--windows", 1,
               "--json", tmp_path / "o.json")
    assert_one_line_error(r, "q4_k needs each row to hold whole blocks of 256")
    assert os.listdir(tmp_path) == []  # not even the reference was computed


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
