"""lowbit eval end to end: a saved model scored against its reference, recomputed when missing, and the reference
row of an imported model; a missing or damaged directory is a one-line error."""

import json
import os

from lowbit.cli import main
from lowbit.layers.surgery import model_weight_bytes
from lowbit.models.hashing import RECORDS

from .helpers import assert_one_line_error, lowbit, run_main


def test_eval_recomputes_a_missing_reference(tiny_lm_dir, tmp_path, monkeypatch):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "q4_0", "-o", str(q)]) == 0
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "empty-cache"))
    assert main(["eval", str(q), "--window", "64", "--windows", "1"]) == 0
    assert len([n for n in os.listdir(tmp_path / "empty-cache") if n != RECORDS]) == 1  # the reference, and the hashes


def test_eval_of_a_missing_or_corrupt_directory(tmp_path, tiny_lm_dir):
    assert_one_line_error(lowbit("eval", tmp_path / "nope"), "no lowbit.json")
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "int8", "-o", str(q)]) == 0
    (q / "model.safetensors").write_bytes(b"\0" * 64)
    assert_one_line_error(lowbit("eval", q, "--window", 64, "--windows", 1), "cannot load model")


def test_eval_of_an_imported_model_reports_the_reference_compare_reports(tiny_lm_dir, tmp_path, capsys):
    """quantize -> export --to bnb -> import -> eval: the reference is the tiny model's 12.9 MB, as compare says,
    not the 12.6 MB of its embedding and norms that the import used to record as model_bytes_before (it now
    records the reference too)."""
    from lowbit import load_model

    original = model_weight_bytes(load_model(str(tiny_lm_dir))[0])  # float32: its bytes are its reference's
    for args in (("quantize", "--model", tiny_lm_dir, "--format", "nf4", "-o", tmp_path / "q"),
                 ("export", tmp_path / "q", "--to", "bnb", "-o", tmp_path / "bnb"),
                 ("import", tmp_path / "bnb", "-o", tmp_path / "imported"),
                 ("eval", tmp_path / "imported", "--windows", "1", "--window", "32", "--json", tmp_path / "e.json")):
        r = run_main(capsys, *args)
        assert r.returncode == 0, r.stderr
    stored = json.loads((tmp_path / "imported" / "lowbit.json").read_text())["quantize"]["model_bytes_before"]
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["reference"]["weight_bytes"] == original == stored
    assert report["results"][0]["weight_bytes"] < original
    assert f"{original / 1e6:.1f}" in r.stdout
