"""`lowbit plot ...` and `lowbit formats LABEL --plot`: files written atomically, one-line errors."""

import json
import subprocess
import sys

import pytest

from lowbit.cli import main

COMPARE = {"model": {"name": "tiny"}, "protocol": {"kind": "causal-lm"}, "results": [
    {"format": "int8", "bits_per_weight": 8.5, "kl_mean": 0.0014, "layer_formats": {"int8": 14}},
    {"format": "nf4", "bits_per_weight": 4.5, "kl_mean": 0.26, "layer_formats": {"nf4": 14}},
    {"format": "mix", "bits_per_weight": 5.0, "kl_mean": 0.05, "layer_formats": {"nf4": 10, "int8": 4}}]}
BENCH = {"rows": [{"format": "bitsandbytes nf4/64", "peer": True, "bits_per_weight": 4.5, "kl_mean": 0.2588}],
         "llama_cpp": None}
ERRORS = {"model": {"name": "tiny"}, "layers": [{"name": "model.layers.0.mlp.down_proj", "shape": [64, 128]}],
          "formats": [{"format": "nf4", "bits_per_weight": 4.5, "mean_sqnr_db": 20.1, "min_sqnr_db": 20.1,
                       "min_layer": "model.layers.0.mlp.down_proj", "gaussian_bound_db": 27.1,
                       "layers": [{"mse": 1e-6, "sqnr_db": 20.1, "max_abs": 0.01, "rel_frobenius": 0.1}]}]}
OUTLIERS = {"model": {"name": "tiny"}, "threshold": 6.0, "hidden_size": 64, "blocks": 1,
            "criteria": {"layer_share": 0.25, "position_share": 0.06}, "hidden_inputs": [], "systematic": [],
            "features": [], "layers": [{"name": "model.layers.0.mlp.down_proj", "in_features": 128, "block": 0,
                                        "positions": 10, "shares_input_with": None, "dims": []}]}
PLAN = {"rules": [{"pattern": "mlp.*", "format": "int8"}, {"pattern": "*", "format": "nf4/32+dq"}]}


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return str(path)


def is_png(path) -> bool:
    return path.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.parametrize("figure, data, extra", [
    ("kl", COMPARE, []), ("errors", ERRORS, []), ("errors", ERRORS, ["--all"]), ("plan", PLAN, []),
    ("plan", COMPARE, []), ("plan", COMPARE, ["--row", "nf4"]), ("outliers", OUTLIERS, [])])
def test_each_figure_is_written(figure, data, extra, tmp_path, capsys):
    out = tmp_path / f"{figure}.png"
    assert main(["plot", figure, write(tmp_path, "in.json", data), "-o", str(out), *extra]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert is_png(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["in.json", out.name])  # no temp file left


def test_kl_with_peers_and_svg(tmp_path, capsys):
    out = tmp_path / "kl.svg"
    assert main(["plot", "kl", write(tmp_path, "c.json", COMPARE), "--peers", write(tmp_path, "b.json", BENCH),
                 "-o", str(out)]) == 0
    assert out.read_text().startswith("<?xml") and "bitsandbytes" in out.read_text()


def test_default_output_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["plot", "errors", write(tmp_path, "e.json", ERRORS)]) == 0
    assert is_png(tmp_path / "errors.png") and "wrote errors.png" in capsys.readouterr().out


def test_a_saved_model_directory_is_read_as_its_plan(tmp_path, capsys):
    model = tmp_path / "model"
    model.mkdir()
    (model / "lowbit.json").write_text(json.dumps({
        "lowbit_layout": 1, "config": {"label": "plan[nf4, int8]"}, "quantize": {"bits_per_weight": 5.0},
        "layers": {"model.layers.0.mlp.down_proj": {"format": "nf4", "block_size": 64, "double_quant": False}}}))
    assert main(["plot", "plan", str(model), "-o", str(tmp_path / "p.png")]) == 0
    assert is_png(tmp_path / "p.png")


@pytest.mark.parametrize("argv, needle", [
    (["plot", "kl", "{errors}"], "is a `lowbit errors --json` report; `lowbit plot kl` reads a `lowbit compare"),
    (["plot", "errors", "{compare}"], "is a `lowbit compare --json` report; `lowbit plot errors` reads a `lowbit "
                                      "errors --json` report"),
    (["plot", "outliers", "{plan}"], "is a per-layer plan"),
    (["plot", "plan", "{outliers}"], "is a `lowbit outliers --json` report; `lowbit plot plan` reads a per-layer"),
    (["plot", "kl", "{compare}", "--peers", "{compare}"], "`lowbit plot kl --peers` reads a benchmarks/bench_quality"),
    (["plot", "kl", "{other}"], "of no kind lowbit writes (keys: hello)"),
    (["plot", "kl", "{tmp}/missing.json"], "missing.json: no such file"),
    (["plot", "kl", "{notjson}"], "is not JSON"),
    (["plot", "kl", "{compare}", "-o", "{tmp}/k.jpg"], "a figure is written as .png, .svg, .pdf"),
    (["plot", "kl", "{compare}", "-o", "{tmp}/nodir/k.png"], "directory does not exist"),
    (["plot", "plan", "{plan}", "--row", "nf4"], "--row picks a row of a compare report"),
    (["plot", "plan", "{compare}", "--row", "nf9"], "no row 'nf9'"),
    (["formats", "--plot", "{tmp}/f.png"], "--plot draws one format's levels"),
    (["formats", "qq4", "--plot", "{tmp}/f.png"], "learned per tensor"),
    (["formats", "fp16", "--plot", "{tmp}/f.png"], "fp16 has no table of levels to draw"),
])
def test_bad_input_is_one_line(argv, needle, tmp_path, capsys):
    files = {"errors": write(tmp_path, "errors.json", ERRORS), "compare": write(tmp_path, "compare.json", COMPARE),
             "plan": write(tmp_path, "plan.json", PLAN), "outliers": write(tmp_path, "outliers.json", OUTLIERS),
             "other": write(tmp_path, "other.json", {"hello": 1}), "tmp": str(tmp_path)}
    (tmp_path / "bad.json").write_text("{not json")
    files["notjson"] = str(tmp_path / "bad.json")
    assert main([a.format(**files) for a in argv]) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert needle in err and err.count("\n") == 0, err
    assert "wrote" not in captured.out and not list(tmp_path.glob("*.png"))


def test_formats_plot_draws_the_levels(tmp_path, capsys):
    out = tmp_path / "nf4.png"
    assert main(["formats", "nf4", "--plot", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and is_png(out)
    assert main(["formats", "q4_0", "--plot", str(tmp_path / "q4_0.pdf")]) == 0
    assert (tmp_path / "q4_0.pdf").read_bytes().startswith(b"%PDF")


def test_other_commands_do_not_load_matplotlib():
    code = ("import sys; from lowbit.cli import main; main(['formats', 'nf4']); "
            "assert 'matplotlib' not in sys.modules, 'matplotlib was imported'")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_plot_levels_of_a_tiny_model(tiny_lm_dir, tmp_path, capsys):
    out = tmp_path / "levels.png"
    assert main(["plot", "levels", "--model", str(tiny_lm_dir), "--layer", "layers.1.mlp.down_proj",
                 "--formats", "int4,nf4,q4_0", "-o", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out and is_png(out)


@pytest.mark.parametrize("layer, needle", [
    ("layers.0.mlp.dwn_proj", "no nn.Linear named layers.0.mlp.dwn_proj; close names: model.layers.0.mlp.down_proj"),
    ("down_proj", "matches 2 layers (model.layers.0.mlp.down_proj, model.layers.1.mlp.down_proj)"),
    ("model.layers.0.mlp", "is a LlamaMLP, not an nn.Linear"),
])
def test_plot_levels_unknown_layer(layer, needle, tiny_lm_dir, tmp_path, capsys):
    assert main(["plot", "levels", "--model", str(tiny_lm_dir), "--layer", layer, "-o",
                 str(tmp_path / "l.png")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # the rest: progress notes
    assert len(errors) == 1 and errors[0].startswith("lowbit plot: error: ") and needle in errors[0], errors


@pytest.mark.parametrize("formats, needle", [("nf4,nf44", "unknown format 'nf44'"), ("nf4+gptq", "on its own"),
                                             ("", "--formats names no format"), ("bf16", "too many to draw")])
def test_plot_levels_bad_format_fails_before_the_model_loads(formats, needle, tmp_path, capsys):
    assert main(["plot", "levels", "--model", str(tmp_path / "no-model"), "--formats", formats, "-o",
                 str(tmp_path / "l.png")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "loading" not in err
