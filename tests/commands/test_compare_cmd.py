"""lowbit compare end to end: the README's check, an encoder, a format the model cannot hold, and its one-line
errors (exit status 2)."""

import json
import os

import pytest

from lowbit.cli import main
from lowbit.models.hashing import RECORDS

from .helpers import assert_one_line_error, lowbit

KEYS = {"format", "bits_per_weight", "weight_bytes", "quantize_seconds", "ppl", "kl_mean", "kl_median", "kl_p99",
        "kl_max", "top1"}


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


@pytest.mark.slow  # 35 s, the default protocol's 512 sentences on MiniLM
def test_minilm_compare(tmp_path):
    out = tmp_path / "m.json"
    assert main(["compare", "--model", "minilm", "--formats", "int8,nf4", "--json", str(out)]) == 0
    results = {r["format"]: r for r in json.loads(out.read_text())["results"]}
    assert 0 < results["int8"]["cos_dist_mean"] < results["nf4"]["cos_dist_mean"] < 0.05
    assert results["int8"]["sentences"] == 512


def test_missing_model_file(tmp_path):
    assert_one_line_error(lowbit("compare", "--model", tmp_path / "nope.gguf", "--windows", 1), "does not exist")


def test_text_shorter_than_one_window(tiny_lm_dir, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("Too short to hold a window.")
    r = lowbit("compare", "--model", tiny_lm_dir, "--formats", "int8", "--text", short, "--json", tmp_path / "o.json")
    assert_one_line_error(r, "fewer than one window of 512")
    assert sorted(os.listdir(tmp_path)) == ["short.txt"]


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
    cache = tmp_path / "cache"  # not even the reference was computed: at most the model files' recorded hashes
    assert os.listdir(tmp_path) in ([], ["cache"]) and (not cache.exists() or os.listdir(cache) == [RECORDS])
