"""Issue 25, "nothing lost": no command writes over its input, into the cache, or over a file lowbit did not write;
a full disk says so; an interrupted QAT keeps its start.

Each refusal is checked as the finding gave it: exit 2, one error line, and every file as it was."""

import errno
import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lowbit.io.gguf_export as gguf_export
from lowbit.models.hashing import RECORDS

from .helpers import assert_one_line_error, run_main

TINY = ["--window", "64", "--windows", "1"]


def snapshot(path):
    """Every file under ``path`` (a directory or a file's directory) with its bytes."""
    return {str(p.relative_to(path)): p.read_bytes() if p.is_file() else None for p in sorted(path.rglob("*"))}


def refused(r, *needles):
    """Exit 2 and one error line, before any model loads (no progress line)."""
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and " error: " in lines[0], r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr


@pytest.fixture(scope="module")
def quantized(tiny_lm_dir, tmp_path_factory):
    """A lowbit output (q4_0, GGUF-exportable) of the tiny Llama."""
    from lowbit.cli import main

    out = tmp_path_factory.mktemp("quantized") / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "q4_0", "-o", str(out)]) == 0
    return out


@pytest.fixture
def gguf_source(tmp_path, monkeypatch):
    """export_gguf copies metadata from the GGUF the model was loaded from: for the tiny Llama (loaded from a
    directory), a hand-built GGUF that holds only its architecture."""
    path = tmp_path / "src.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    monkeypatch.setattr(gguf_export, "source_gguf", lambda source: path)
    return path


def foreign_gguf(path, quantized_by=None):
    writer = gguf.GGUFWriter(path, "llama")
    if quantized_by:
        writer.add_string("general.quantized_by", quantized_by)
    writer.add_tensor("x", np.zeros(4, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


# ---- finding 1: export --to gguf


def test_gguf_export_never_writes_over_the_input_model(quantized, tmp_path, capsys):
    before = snapshot(quantized)
    (tmp_path / "link.gguf").symlink_to(quantized / "model.safetensors")
    for target, why in ((quantized / "model.safetensors", "lies inside the input"),
                        (quantized / "lowbit.json", "lies inside the input"),
                        (quantized / "new.gguf", "lies inside the input"),
                        (tmp_path / "link.gguf", "lies inside the input")):
        for extra in ([], ["--overwrite"]):
            refused(run_main(capsys, "export", quantized, "--to", "gguf", "-o", target, *extra), why)
    assert snapshot(quantized) == before


def test_gguf_export_refuses_an_existing_file_and_overwrites_only_its_own(quantized, gguf_source, tmp_path, capsys):
    mine = tmp_path / "mine.gguf"
    foreign_gguf(mine, quantized_by="someone")
    notes = tmp_path / "notes.txt"
    notes.write_text("years of work")
    before = snapshot(tmp_path)
    for target in (mine, notes):
        refused(run_main(capsys, "export", quantized, "--to", "gguf", "-o", target), "output exists",
                "pass --overwrite")
        refused(run_main(capsys, "export", quantized, "--to", "gguf", "-o", target, "--overwrite"),
                "--overwrite replaces only a GGUF file lowbit wrote", "is not one")
    assert snapshot(tmp_path) == before
    out = tmp_path / "q.gguf"
    assert run_main(capsys, "export", quantized, "--to", "gguf", "-o", out).returncode == 0
    assert gguf_export.is_lowbit_gguf(out)
    refused(run_main(capsys, "export", quantized, "--to", "gguf", "-o", out), "output exists")
    os.utime(out, (0, 0))
    r = run_main(capsys, "export", quantized, "--to", "gguf", "-o", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mtime > 0 and gguf_export.is_lowbit_gguf(out)  # replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine.gguf", "notes.txt", "q.gguf", "src.gguf"]
    refused(run_main(capsys, "export", quantized, "--to", "bnb", "-o", tmp_path / "b", "--overwrite"),
            "bnb export writes a new directory")


def test_gguf_export_recognises_its_files_by_their_metadata(tmp_path):
    assert not gguf_export.is_lowbit_gguf(foreign_gguf(tmp_path / "a.gguf"))
    assert gguf_export.is_lowbit_gguf(foreign_gguf(tmp_path / "b.gguf", quantized_by="lowbit"))
    (tmp_path / "c.gguf").write_bytes(b"GGUF" + b"\xff" * 40)  # a damaged header
    assert not gguf_export.is_lowbit_gguf(tmp_path / "c.gguf")


# ---- finding 16: disk full during export --to gguf


@pytest.mark.parametrize(("free", "message"), [(1000, "No space left on device"), (10**12, "Input/output error")])
def test_a_short_write_in_gguf_export_is_the_os_error(quantized, gguf_source, tmp_path, capsys, monkeypatch, free,
                                                      message):
    """gguf-py writes tensors with numpy's tofile, which reports a short fwrite as '15925248 requested and 1409120
    written' with no errno; with less room on the disk than the rest, that is ENOSPC, else EIO."""
    import lowbit.files.atomic as atomic

    def short(self, *args, **kwargs):
        self.fout[0].write(b"\0" * 1409120)
        raise OSError("15925248 requested and 1409120 written")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", short)
    monkeypatch.setattr(atomic.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**13, 10**13, free))
    out = tmp_path / "q.gguf"
    r = run_main(capsys, "export", quantized, "--to", "gguf", "-o", out)
    refused(r, message, str(out))
    assert "requested" not in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.gguf"]


# ---- finding 3: no command writes over one of its inputs


def test_no_command_writes_over_its_input(tiny_lm_dir, quantized, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    plan = tmp_path / "p.json"
    plan.write_text(json.dumps({"rules": [{"pattern": "*", "format": "int8"}]}))
    os.link(text, tmp_path / "hard.txt")  # the same file under another name
    (tmp_path / "sym.json").symlink_to(plan)
    page = tmp_path / "R.html"
    page.write_text("<html>my report</html>")
    results = tmp_path / "c.png"  # a compare JSON under a figure's name
    results.write_text("{}")
    counted = foreign_gguf(tmp_path / "m.gguf")
    model = ["--model", tiny_lm_dir]
    cases = [
        (["compare", *model, "--plan", plan, "--json", plan, *TINY], "is the input"),
        (["memory", "--model", counted, "--json", counted], "is the input"),
        (["compare", *model, "--plan", plan, "--json", tmp_path / "sym.json", *TINY], "is the input"),
        (["compare", *model, "--formats", "int8", "--text", text, "--json", text, *TINY], "is the input"),
        (["compare", *model, "--formats", "int8", "--text", text, "--json", tmp_path / "hard.txt", *TINY],
         "is the input"),
        (["compare", *model, "--formats", "int8", "--json", tmp_path / "r.html", "--report", tmp_path / "r.html",
          *TINY], "named for two outputs"),
        (["compare", *model, "--formats", "int8", "--json", tiny_lm_dir / "config.json", *TINY], "lies inside"),
        (["errors", *model, "--formats", "int8", "--text", text, "--json", text], "is the input"),
        (["outliers", *model, "--text", text, "--json", text], "is the input"),
        (["sensitivity", *model, "--text", text, "--json", text], "is the input"),
        (["eval", quantized, "--text", text, "--json", text, *TINY], "is the input"),
        (["eval", quantized, "--json", quantized / "lowbit.json", *TINY], "lies inside"),
        (["report", page, "-o", page], "is the input"),
        (["plot", "kl", results, "-o", results], "is the input"),
        (["plot", "levels", *model, "-o", tiny_lm_dir / "levels.png"], "lies inside"),
        (["qat", *model, "--plan", plan, "-o", plan], "output exists"),
    ]
    before, model_before, q_before = snapshot(tmp_path), snapshot(tiny_lm_dir), snapshot(quantized)
    for argv, needle in cases:
        refused(run_main(capsys, *argv), needle)
    assert snapshot(tmp_path) == before and snapshot(tiny_lm_dir) == model_before and snapshot(quantized) == q_before


# ---- finding 4: no output inside the cache


def test_outputs_inside_the_cache_are_refused(tiny_lm_dir, quantized, tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    entry = cache / ("model-" + "0" * 32)
    entry.mkdir(parents=True)
    monkeypatch.setenv("LOWBIT_CACHE", str(cache))
    results = tmp_path / "c.json"
    results.write_text("{}")
    model = ["--model", tiny_lm_dir]
    cases = [
        ["quantize", *model, "--format", "int8", "-o", entry / "sub"],
        ["quantize", *model, "--format", "int8", "-o", cache / "q"],
        ["quantize", *model, "--format", "int8", "-o", cache, "--overwrite"],
        ["quantize", *model, "--format", "int8", "-o", tmp_path, "--overwrite"],  # holds the cache
        ["import", quantized, "-o", cache / "imported"],
        ["export", quantized, "--to", "gguf", "-o", entry / "x.gguf"],
        ["export", quantized, "--to", "bnb", "-o", cache / "bnb"],
        ["qat", *model, "--format", "int4", "-o", cache / "q"],
        ["compare", *model, "--formats", "int8", "--json", cache / "r.json", *TINY],
        ["compare", *model, "--formats", "int8", "--report", entry / "r.html", *TINY],
        ["report", results, "-o", cache / "r.html"],
        ["plot", "kl", results, "-o", cache / "kl.png"],
        ["memory", "--params", "1000", "--json", cache / "m.json"],
    ]
    before = snapshot(tmp_path)
    for argv in cases:
        r = run_main(capsys, *argv)
        refused(r)
        assert "cache" in r.stderr or "holds" in r.stderr, (argv, r.stderr)
    assert snapshot(tmp_path) == before


def test_the_cache_still_writes_its_own_entries(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    r = run_main(capsys, "compare", "--model", tiny_lm_dir, "--formats", "int8", *TINY)
    assert r.returncode == 0, r.stderr
    entries = [p.name for p in (tmp_path / "cache").iterdir() if p.name != RECORDS]  # RECORDS: the files' hashes
    assert [name.startswith("ref-causal-") for name in entries] == [True]


# ---- finding 15: qat --overwrite


def test_qat_overwrite_replaces_only_an_earlier_lowbit_output(tiny_lm_dir, quantized, tmp_path, capsys):
    args = ["qat", "--model", tiny_lm_dir, "--format", "int4/32", "--init", "rule", "--steps", "1",
            "--train-window", "32", *TINY]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    refused(run_main(capsys, *args, "-o", mine), "output exists", "pass --overwrite")
    refused(run_main(capsys, *args, "-o", mine, "--overwrite"), str(mine))
    assert snapshot(mine) == {"thesis.tex": b"years of work"}
    out = tmp_path / "q"
    shutil.copytree(quantized, out)
    r = run_main(capsys, *args, "-o", out, "--overwrite")
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "lowbit.json").read_text())["config"]["label"] == "int4/32 qat"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine", "q"]


# ---- finding 22: an interrupted QAT keeps its start


def test_qat_interrupted_before_the_first_checkpoint_resumes_from_its_gptq_start(tiny_lm_dir, tmp_path, capsys,
                                                                                 monkeypatch):
    """Ctrl-C at step 2 of 28 (the first regular checkpoint is at step 25): the GPTQ start is kept, and --resume
    goes on from it without computing it again, to the model an uninterrupted run writes, bit for bit."""
    import lowbit.methods.qat_train as qat_train
    import lowbit.workflows.qat as qat_workflow

    args = ["qat", "--model", tiny_lm_dir, "--format", "int3/32", "--steps", "4", "--train-window", "32", *TINY]
    assert run_main(capsys, *args, "-o", tmp_path / "straight").returncode == 0
    step_loss, calls = qat_train.step_loss, {"n": 0}

    def interrupted(*a):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return step_loss(*a)

    monkeypatch.setattr(qat_train, "step_loss", interrupted)
    out = tmp_path / "q"
    r = run_main(capsys, *args, "-o", out)
    assert r.returncode == 130 and "--resume continues it" in r.stderr
    checkpoint = tmp_path / "q.qat-checkpoint"
    assert not out.exists() and checkpoint.is_dir()
    assert json.loads((checkpoint / "state.json").read_text())["step"] == 0  # the start, before step 1
    monkeypatch.setattr(qat_train, "step_loss", step_loss)

    def no_second_gptq(*a, **k):
        raise AssertionError("--resume computed the GPTQ start again")

    monkeypatch.setattr(qat_workflow, "gptq_start", no_second_gptq)
    r = run_main(capsys, *args, "-o", out, "--resume")
    assert r.returncode == 0, r.stderr
    assert not checkpoint.exists()
    expected, resumed = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == resumed.keys() and all(torch.equal(expected[k], resumed[k]) for k in expected)


def test_a_qat_run_diverging_at_once_keeps_its_start_for_a_lower_lr(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    import lowbit.methods.qat_train as qat_train

    args = ["qat", "--model", tiny_lm_dir, "--format", "int4/32", "--init", "rule", "--steps", "2",
            "--train-window", "32", *TINY, "-o", tmp_path / "q"]
    step_loss = qat_train.step_loss
    monkeypatch.setattr(qat_train, "step_loss", lambda *a: step_loss(*a) * float("nan"))
    assert_one_line_error(run_main(capsys, *args), "at step 1; the start is kept in", "--resume it with a lower --lr")
    monkeypatch.setattr(qat_train, "step_loss", step_loss)
    r = run_main(capsys, *args, "--resume", "--lr", "1e-6")
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]


def test_enospc_keeps_its_errno(tmp_path):
    from lowbit.files.atomic import write_errors

    with pytest.raises(OSError) as e, write_errors(tmp_path / "x"):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "x")
