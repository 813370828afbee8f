"""Issue 7: what must never happen to a user's files, and failures that must be one line."""

import errno
import json
import os
import signal

import pytest
import torch
from rich.console import Console
from safetensors import safe_open

from lowbit.cli import main
from lowbit.io import load_quantized
from lowbit.models.hashing import RECORDS

from .helpers import assert_one_line_error, lowbit

TINY = ["--window", "64", "--windows", "1"]


def tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_overwrite_refuses_the_input_model_and_unrelated_directories(tiny_lm_dir, tmp_path):
    import shutil

    victim = tmp_path / "victim"
    shutil.copytree(tiny_lm_dir, victim)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    before = tree(tmp_path)
    # 'victim' without ./ : an existing local directory, never a hub id
    assert_one_line_error(lowbit("quantize", "--model", "victim", "--format", "nf4", "-o", "victim", "--overwrite",
                                 cwd=tmp_path), "input model")
    assert_one_line_error(lowbit("quantize", "--model", victim, "--format", "nf4", "-o", tmp_path, "--overwrite"),
                          "input model")
    assert_one_line_error(lowbit("quantize", "--model", victim, "--format", "nf4", "-o", mine, "--overwrite"),
                          "earlier lowbit output", str(mine))
    assert tree(tmp_path) == before


def test_sigterm_during_a_write_leaves_no_temp_files(tiny_lm_dir, tmp_path, monkeypatch):
    """SIGTERM arriving while a file is being written (here: just before the atomic rename)
    is handled like Ctrl-C: the temp directory goes, exit 143. Same for the JSON of compare."""
    import lowbit.files.atomic as atomic

    real_fsync = atomic._fsync

    def fsync_then_sigterm(path):
        real_fsync(path)
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(atomic, "_fsync", fsync_then_sigterm)
    out = tmp_path / "out"
    out.mkdir()
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "nf4", "-o", str(out / "q")]) == 143
    assert os.listdir(out) == []
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    assert main(["compare", "--model", str(tiny_lm_dir), "--formats", "int8", *TINY, "--json",
                 str(out / "r.json")]) == 143
    assert os.listdir(out) == [] and not [p for p in (tmp_path / "cache").rglob("*") if p.name.endswith(".tmp")]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL or callable(signal.getsignal(signal.SIGTERM))


def test_windows_beyond_the_text_and_window_beyond_the_context(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "t.txt"
    text.write_text("word " * 1000)  # 1000 tokens: 15 windows of 64
    r = lowbit("compare", "--model", tiny_lm_dir, "--formats", "int8", "--text", text, "--window", 64,
               "--windows", 16)
    assert_one_line_error(r, "holds 15 windows of 64 tokens", "--windows 15")
    r = lowbit("compare", "--model", tiny_lm_dir, "--formats", "int8", "--window", 2048, "--windows", 1)
    assert_one_line_error(r, "context of 1024 tokens")
    cache = tmp_path / "cache"  # no reference: only the model files' recorded hashes (lowbit.models.hashing)
    assert not cache.exists() or [p.name for p in cache.iterdir()] == [RECORDS]


@pytest.mark.parametrize("case", ["text-dir", "text-empty", "proc-output", "proc-json", "cache-file"])
def test_bad_paths_fail_before_the_model_loads(tmp_path, monkeypatch, case):
    """The default model takes seconds to load: each of these fails first, in one line."""
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    monkeypatch.setenv("LOWBIT_CACHE", str(empty) if case == "cache-file" else str(tmp_path / "cache"))
    args = {
        "cache-file": ("compare", "--formats", "int8"),
        "text-dir": ("compare", "--text", tmp_path),
        "text-empty": ("compare", "--text", empty),
        "proc-output": ("quantize", "--format", "nf4", "-o", "/proc/lowbit-out"),
        "proc-json": ("compare", "--json", "/proc/lowbit.json"),
    }[case]
    needle = {"cache-file": "LOWBIT_CACHE is not a directory",
              "text-dir": "directory, not a text file", "text-empty": "empty", "proc-output": "cannot write",
              "proc-json": "cannot write"}[case]
    r = lowbit(*args)
    assert_one_line_error(r, needle)
    assert "loading" not in r.stderr


def test_disk_full_while_saving_is_one_line(tiny_lm_dir, tmp_path, monkeypatch):
    from lowbit.files.spill import Spill

    def full(self, names, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # what write() raises on a full disk

    monkeypatch.setattr(Spill, "write", full)  # where a shard's bytes are written
    with pytest.raises(OSError, match="No space left on device") as e:
        model_io_save(tiny_lm_dir, tmp_path / "q")
    assert e.value.errno == 28 and os.listdir(tmp_path) == []
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "int8", "-o", str(tmp_path / "q")]) == 2
    assert os.listdir(tmp_path) == []


def model_io_save(model_dir, out):
    from lowbit import QuantPlan, load_model, quantize_model
    from lowbit.io import save_quantized

    model, tokenizer, info = load_model(model_dir)
    plan = QuantPlan.uniform("int8")
    report = quantize_model(model, plan, progress=False)
    return save_quantized(model, tokenizer, info, report, plan, out)


def test_reshaped_layer_in_lowbit_json_is_refused(tiny_lm_dir, tmp_path):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "int8", "-o", str(q)]) == 0
    meta = json.loads((q / "lowbit.json").read_text())
    layer = meta["layers"]["model.layers.0.self_attn.q_proj"]
    assert layer["shape"] == [64, 64]
    layer["shape"] = [32, 128]  # same size, another shape: the parts still match it
    (q / "lowbit.json").write_text(json.dumps(meta))
    assert_one_line_error(lowbit("eval", q, *TINY), "has shape (32, 128), but the architecture's is (64, 64)")


def test_keep_dtype_fp16_stores_the_rest_in_fp16_and_compare_shows_its_cost(tiny_lm_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    q32, q16 = tmp_path / "q32", tmp_path / "q16"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "nf4", "-o", str(q32)]) == 0
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "nf4", "--keep-dtype", "fp16",
                 "-o", str(q16)]) == 0
    with safe_open(q16 / "model.safetensors", "pt") as f:
        assert f.get_slice("model.embed_tokens.weight").get_dtype() == "F16"
    assert (q16 / "model.safetensors").stat().st_size < 0.6 * (q32 / "model.safetensors").stat().st_size
    model, _, meta = load_quantized(q16)
    assert meta["config"]["keep_dtype"] == "float16"
    assert model.model.embed_tokens.weight.dtype == torch.float32  # computes in fp32, values rounded through fp16
    out = tmp_path / "c.json"
    assert main(["compare", "--model", str(tiny_lm_dir), "--formats", "nf4", "--keep-dtype", "fp16", *TINY,
                 "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    keep, nf4 = report["results"]
    assert keep["format"] == "keep fp16" and 0 < keep["kl_mean"] < nf4["kl_mean"]
    assert nf4["weight_bytes"] < keep["weight_bytes"] < report["reference"]["weight_bytes"]
    assert main(["eval", str(q16), *TINY, "--json", str(tmp_path / "e.json")]) == 0
    evaluated = json.loads((tmp_path / "e.json").read_text())["results"][0]
    assert evaluated["kl_mean"] == nf4["kl_mean"]  # the saved model is what compare scored


def test_include_exclude_on_the_command_line(tiny_lm_dir, tmp_path):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "nf4/128+dq", "--include", "mlp.*",
                 "--exclude", "down_proj", "-o", str(q)]) == 0
    meta = json.loads((q / "lowbit.json").read_text())
    assert sorted({name.rsplit(".", 1)[1] for name in meta["layers"]}) == ["gate_proj", "up_proj"]
    assert meta["config"]["label"] == "nf4/128+dq"


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("lowbit 0.")


def test_table_fits_80_columns_without_cutting_numbers():
    from lowbit.report.table import compare_table

    result = {"format": "nf4+dq", "bits_per_weight": 4.127, "weight_bytes": 168.2e6, "quantize_seconds": 0.27,
              "ppl": 19.079, "kl_mean": 0.2606, "kl_median": 0.1712, "kl_p99": 1.1729, "kl_max": 4.5123,
              "top1": 0.7364}
    report = {"model": {"name": "SmolLM2-135M-Instruct.Q4_1"}, "reference": {"weight_bytes": 538.1e6, "ppl": 14.937},
              "protocol": {"kind": "causal-lm", "windows": 16, "window": 512, "text": "pydoc_data.topics"},
              "results": [result, {"format": "q4_k", "error": "q4_k needs each row to hold whole blocks of 256"}]}
    for width in (80, 200):
        console = Console(width=width, record=True)
        console.print(compare_table(report, width=width))
        text = console.export_text()
        assert max(map(len, text.splitlines())) <= width
        for shown in ("nf4+dq", "19.079", "0.26060", "14.937", "q4_k: not scored"):
            assert shown in text, (width, text)
    assert "KL median" in text and "0.17120" in text and "4.512" in text  # the wide table has every column
