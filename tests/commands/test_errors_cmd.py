"""lowbit errors: per-layer weight SQNR of several formats, checked against an independent computation.

The command is driven through a parser built from ``errors_cmd.add_parser`` (as lowbit.cli builds its own),
so ``run`` raises what ``lowbit.cli.main`` turns into its one-line errors (ValueError/OSError -> exit 2).
"""

import argparse
import json

import numpy as np
import pytest

import lowbit
from lowbit.commands import errors_cmd

from ..workflows.helpers import sqnr_db

KINDS = ["model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.k_proj", "model.layers.*.self_attn.v_proj",
         "model.layers.*.self_attn.o_proj", "model.layers.*.mlp.gate_proj", "model.layers.*.mlp.up_proj",
         "model.layers.*.mlp.down_proj"]


def errors(*argv):
    parser = argparse.ArgumentParser(prog="lowbit")
    errors_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["errors", *map(str, argv)])
    return args.run(args)


def test_tiny_model_table_and_json(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    assert errors("--model", tiny_lm_dir, "--formats", "nf4,int8,q4_0", "--json", out) == 0
    report = json.loads(out.read_text())
    names = [layer["name"] for layer in report["layers"]]
    assert len(names) == 14 and "lm_head" not in names  # 2 blocks x 7 Linears; lm_head excluded by default
    assert [f["format"] for f in report["formats"]] == ["nf4", "int8", "q4_0"]
    model = lowbit.load_model(str(tiny_lm_dir))[0]
    modules = dict(model.named_modules())
    for f in report["formats"]:
        for name, layer, errs in zip(names, report["layers"], f["layers"], strict=True):
            w = modules[name].weight
            assert layer["shape"] == list(w.shape)
            assert errs["sqnr_db"] == pytest.approx(sqnr_db(w, f["format"]), abs=1e-9)
        sqnr = [e["sqnr_db"] for e in f["layers"]]
        assert f["mean_sqnr_db"] == pytest.approx(sum(sqnr) / 14) and f["min_sqnr_db"] == min(sqnr)
        assert f["gaussian_bound_db"] == pytest.approx(6.0206 * f["bits_per_weight"], abs=1e-3)
        stored = sum(lowbit.quantize(modules[n].weight.detach(), f["format"]).nbytes for n in names)
        assert f["bits_per_weight"] == 8 * stored / sum(modules[n].weight.numel() for n in names)
    by = {f["format"]: f for f in report["formats"]}
    assert by["int8"]["mean_sqnr_db"] > by["q4_0"]["mean_sqnr_db"] > 15
    assert by["nf4"]["bits_per_weight"] == 4.5
    table = capsys.readouterr().out
    assert all(kind in table for kind in KINDS) and "Gaussian bound" in table and f"wrote {out}" in table
    assert "model.layers.0." not in table  # grouped by kind unless --all


def test_all_prints_one_row_per_layer(tiny_lm_dir, capsys):
    assert errors("--model", tiny_lm_dir, "--formats", "nf4", "--all") == 0
    table = capsys.readouterr().out
    for block in (0, 1):
        assert f"model.layers.{block}.mlp.down_proj" in table and f"model.layers.{block}.self_attn.q_proj" in table
    assert "model.layers.*" not in table


def test_layers_pattern_selects_exactly_what_it_matches(tiny_lm_dir, tmp_path):
    out = tmp_path / "e.json"
    assert errors("--model", tiny_lm_dir, "--formats", "nf4", "--layers", "mlp.*", "--layers", "lm_head",
                  "--json", out) == 0
    names = [layer["name"] for layer in json.loads(out.read_text())["layers"]]
    assert names == [f"model.layers.{b}.mlp.{p}" for b in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")] + \
        ["lm_head"]


def test_format_a_layer_shape_cannot_hold_is_a_row_error(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "e.json"
    # q4_k needs rows of whole 256-weight blocks; the tiny model's rows hold 64 or 128
    assert errors("--model", tiny_lm_dir, "--formats", "nf4,q4_k", "--json", out) == 1
    q4_k = json.loads(out.read_text())["formats"][1]
    assert q4_k.keys() == {"format", "error"} and "256" in q4_k["error"]
    assert "q4_k: not measured" in capsys.readouterr().out


@pytest.mark.parametrize("argv, error, needle", [
    (("--formats", "nf9"), ValueError, "nf9"),
    (("--formats", ","), ValueError, "names no format"),
    (("--formats", "nf4", "--json", "/proc/lowbit-errors.json"), OSError, "/proc"),
    (("--formats", "int4+gptq"), ValueError, "int4\\+gptq: lowbit errors measures each weight tensor"),
    (("--formats", "nf4,nf4/32+had"), ValueError, "score them with lowbit compare"),
])
def test_bad_input_fails_before_the_model_loads(argv, error, needle, tmp_path, capsys):
    missing = tmp_path / "not-a-model"  # never loaded: each check runs first
    with pytest.raises(error, match=needle) as info:
        errors("--model", missing, *argv)
    assert "\n" not in str(info.value)
    assert "loading" not in capsys.readouterr().err


def test_pattern_matching_no_layer_writes_nothing(tiny_lm_dir, tmp_path):
    out = tmp_path / "e.json"
    with pytest.raises(ValueError, match=r"--layers 'attn\.\*' matched no nn.Linear layer") as info:
        errors("--model", tiny_lm_dir, "--formats", "nf4", "--layers", "attn.*", "--json", out)
    assert "\n" not in str(info.value) and "model.layers.0.self_attn.q_proj" in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_activation_weighted_search_calibrates_as_compare_does(tiny_lm_dir, tmp_path):
    """nf4@amse quantizes with the mean squared inputs of the windows after those compare scores (here
    --windows 1: window 2 onwards), and every format then gets an activation-weighted SQNR."""
    from lowbit.calibration.importance import calibrate

    out = tmp_path / "e.json"
    assert errors("--model", tiny_lm_dir, "--formats", "nf4,nf4@amse", "--layers", "mlp.*", "--window", 64,
                  "--windows", 1, "--calibrate", 2, "--json", out) == 0
    report = json.loads(out.read_text())
    assert report["calibration"].items() >= {"text": "pydoc_data.topics", "window": 64, "scored": 1,
                                             "windows": 2}.items()
    model, tokenizer, _ = lowbit.load_model(str(tiny_lm_dir))
    names = [layer["name"] for layer in report["layers"]]
    importance = calibrate(model, tokenizer, "causal-lm", None, window=64, scored=1, count=2, layers=names,
                           progress=False)
    modules = dict(model.named_modules())
    plain, searched = report["formats"]
    for i, name in enumerate(names):
        w, imp = modules[name].weight.detach(), importance[name]
        y = lowbit.quantize(w, "nf4", search="amse", importance=imp).dequantize()
        x, yn, wn = (t.numpy().astype(np.float64) for t in (w, y, imp))
        assert searched["layers"][i]["sqnr_db"] == pytest.approx(10 * np.log10((x**2).sum() / ((x - yn) ** 2).sum()),
                                                                 abs=1e-9)
        assert searched["layers"][i]["weighted_sqnr_db"] == pytest.approx(
            10 * np.log10((wn * x**2).sum() / (wn * (x - yn) ** 2).sum()), abs=1e-9)
        # per block, the search keeps the format's own scale unless another has less weighted error
        assert searched["layers"][i]["weighted_sqnr_db"] >= plain["layers"][i]["weighted_sqnr_db"]
    assert searched["mean_weighted_sqnr_db"] > plain["mean_weighted_sqnr_db"]


@pytest.mark.parametrize("argv, needle", [
    (("--formats", "nf4", "--calibrate", 4), "no format asks for one"),
    (("--formats", "nf4@amse", "--calibrate", 0), "--calibrate: must be a whole number from 1"),
    (("--formats", "nf4@amse", "--window", 1), "--window: must be a whole number from 2"),
])
def test_bad_calibration_arguments_fail_before_the_model_loads(argv, needle, tmp_path, capsys):
    # a range is checked as the argument is read (lowbit.limits): argparse's error, exit 2
    with pytest.raises((ValueError, SystemExit)) as raised:
        errors("--model", tmp_path / "not-a-model", *argv)
    err = capsys.readouterr().err
    assert needle in (err if raised.type is SystemExit else str(raised.value)) and "loading" not in err


def test_weight_only_search_matches_quantize(tiny_lm_dir, tmp_path):
    out = tmp_path / "e.json"
    assert errors("--model", tiny_lm_dir, "--formats", "int4_asym/32@hqq,int4@mse,int4", "--layers", "down_proj",
                  "--json", out) == 0
    report = json.loads(out.read_text())
    model = lowbit.load_model(str(tiny_lm_dir))[0]
    w = model.model.layers[1].mlp.down_proj.weight.detach()
    by = {f["format"]: f for f in report["formats"]}
    for label, kwargs in (("int4_asym/32@hqq", dict(block_size=32, search="hqq")), ("int4@mse", dict(search="mse"))):
        y = lowbit.quantize(w, label.split("/")[0].split("@")[0], **kwargs).dequantize()
        x, yn = w.numpy().astype(np.float64), y.numpy().astype(np.float64)
        expected = 10 * np.log10((x**2).sum() / ((x - yn) ** 2).sum())
        assert by[label]["layers"][1]["sqnr_db"] == pytest.approx(expected, abs=1e-9)
    # the search minimizes each block's squared error over clipping ratios that include the format's rule
    assert by["int4@mse"]["mean_sqnr_db"] >= by["int4"]["mean_sqnr_db"]


def test_layer_kind():
    assert errors_cmd.layer_kind("model.layers.12.mlp.up_proj") == "model.layers.*.mlp.up_proj"
    assert errors_cmd.layer_kind("encoder.layer.3.attention.self.query") == "encoder.layer.*.attention.self.query"
    assert errors_cmd.layer_kind("lm_head") == "lm_head"
    assert errors_cmd.layer_kind("h.0.proj_2") == "h.*.proj_2"  # only whole-number parts
