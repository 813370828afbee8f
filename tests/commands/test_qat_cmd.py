"""lowbit qat end to end on a tiny model, and its one-line refusals."""

import json

from lowbit.cli import main
from lowbit.io.model_io import load_quantized

ARGS = ["--steps", "3", "--train-window", "32", "--window", "64", "--windows", "1"]


def test_qat_saves_a_model_eval_scores(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["qat", "--model", str(tiny_lm_dir), "--format", "int3/32", *ARGS, "-o", str(out)]) == 0
    assert "int3/32 qat: 14 layers" in capsys.readouterr().out
    assert not (tmp_path / "q.qat-checkpoint").exists()  # removed once the model is written
    _, _, meta = load_quantized(out)
    assert meta["qat"]["steps"] == 3 and meta["config"]["label"] == "int3/32 qat"
    assert main(["eval", str(out), "--window", "64", "--windows", "1", "--json", str(tmp_path / "e.json")]) == 0
    row = json.loads((tmp_path / "e.json").read_text())["results"][0]
    assert row["format"] == "int3/32 qat" and row["kl_mean"] > 0


def test_qat_refusals_are_one_line_and_write_nothing(tiny_lm_dir, tmp_path, capsys):
    model = ["--model", str(tiny_lm_dir)]
    short = tmp_path / "short.txt"
    short.write_text("a few words, far too few to train on. " * 12)
    cases = [
        (["--format", "q4_k", *ARGS], "GGUF block format"),
        (["--format", "nvfp4", *ARGS], "as codes"),
        (["--format", "int4", "--text", str(short), *ARGS], "training needs at least 4"),
        (["--format", "int4", "--resume", *ARGS], "--resume: no checkpoint"),
        (["--format", "int4", "--steps", "0"], "--steps needs at least 1"),
        (["--format", "int4", "--lr", "nan"], "--lr is a positive number"),
    ]
    for extra, message in cases:
        assert main(["qat", *model, *extra, "-o", str(tmp_path / "out")]) == 2, extra
        assert message in capsys.readouterr().err, extra
    (tmp_path / "exists").mkdir()
    assert main(["qat", *model, "--format", "int4", *ARGS, "-o", str(tmp_path / "exists")]) == 2
    assert "exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "short.txt"]


def test_qat_can_start_from_gptq(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["qat", "--model", str(tiny_lm_dir), "--format", "int4/32", "--init", "gptq", *ARGS,
                 "-o", str(out)]) == 0
    _, _, meta = load_quantized(out)
    assert meta["qat"]["init"] == "gptq"
