"""lowbit qat end to end on a tiny model, and its one-line refusals."""

import json

import pytest
import torch

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
    assert meta["qat"]["init"] == "gptq"  # the default start
    assert meta["quantize"]["seconds"] == meta["qat"]["seconds"]  # eval's "quantize s" is the run's cost
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
        (["--format", "int4/99999999999999999999", *ARGS], "block size must be a whole number from 1"),
    ]
    for extra, message in cases:
        assert main(["qat", *model, *extra, "-o", str(tmp_path / "out")]) == 2, extra
        assert message in capsys.readouterr().err, extra
    ranged = [  # read with limits.Range: refused while the arguments are read, before any model loads
        (["--format", "int4", "--steps", "0"], "--steps: must be a whole number from 1"),
        (["--format", "int4", "--lr", "nan"], "--lr: must be a number in (0, 1]"),
        (["--format", "int4", "--scale-lr", "1e5"], "--scale-lr: must be a number in (0, 1]"),
        (["--format", "int4", "--train-window", "1"], "--train-window: must be a whole number from 2"),
        (["--format", "int4", "--block-size", "0"], "--block-size: must be a whole number from 1"),
    ]
    for extra, message in ranged:
        with pytest.raises(SystemExit) as exit_:
            main(["qat", *model, *extra, "-o", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and len(err.strip().splitlines()) == 1, (extra, err)
    (tmp_path / "exists").mkdir()
    assert main(["qat", *model, "--format", "int4", *ARGS, "-o", str(tmp_path / "exists")]) == 2
    assert "exists" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "short.txt"]


def test_qat_can_start_from_searched_steps(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["qat", "--model", str(tiny_lm_dir), "--format", "int4/32", "--init", "mse", *ARGS,
                 "-o", str(out)]) == 0
    _, _, meta = load_quantized(out)
    assert meta["qat"]["init"] == "mse"


def test_qat_trains_a_hadamard_rotated_layout_from_its_gptq(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "q"
    assert main(["qat", "--model", str(tiny_lm_dir), "--format", "int4/32+had", *ARGS, "-o", str(out)]) == 0
    model, _, meta = load_quantized(out)
    assert meta["config"]["label"] == "int4/32+had qat" and meta["qat"]["init"] == "gptq"
    assert all(m.signs is not None for m in model.modules() if hasattr(m, "signs"))


def test_an_interrupted_qat_resumes_to_the_uninterrupted_model(tiny_lm_dir, tmp_path, capsys, monkeypatch):
    """Ctrl-C after the step-25 checkpoint: no output directory, the checkpoint kept; --resume then writes the
    model an uninterrupted run writes, bit for bit, and removes the checkpoint."""
    from safetensors.torch import load_file

    import lowbit.methods.qat_train as qat_train

    args = ["qat", "--model", str(tiny_lm_dir), "--format", "int3/32", "--init", "mse", "--steps", "28",
            "--train-window", "32", "--window", "64", "--windows", "1"]
    assert main([*args, "-o", str(tmp_path / "straight")]) == 0
    step_loss, calls = qat_train.step_loss, {"n": 0}

    def interrupted(*a):
        calls["n"] += 1
        if calls["n"] == 27:
            raise KeyboardInterrupt
        return step_loss(*a)

    monkeypatch.setattr(qat_train, "step_loss", interrupted)
    out = tmp_path / "q"
    assert main([*args, "-o", str(out)]) == 130
    assert "--resume continues it" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "q.qat-checkpoint").is_dir()
    assert main([*args, "-o", str(out)]) == 2  # a second start would overwrite the interrupted run
    assert "holds an interrupted run" in capsys.readouterr().err
    monkeypatch.setattr(qat_train, "step_loss", step_loss)
    assert main([*args, "-o", str(out), "--resume"]) == 0
    assert not (tmp_path / "q.qat-checkpoint").exists()
    files = sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors")
    assert files
    for name in files:
        expected, resumed = load_file(tmp_path / "straight" / name), load_file(out / name)
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[k], resumed[k]) for k in expected)
