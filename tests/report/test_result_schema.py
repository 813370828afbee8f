"""Finding 12 of issue 25: result JSON is checked against its kind's schema when it is read, so a wrong-typed field
is one line naming the file, the JSON path and what belongs there (exit 2, nothing written), never a TypeError or
AttributeError in lowbit.report.plot_data. Every entry point that reads result JSON is tried."""

import copy
import json
import re

import pytest

from lowbit.cli import main
from lowbit.errors import InputError
from lowbit.report.result_schema import SCHEMAS, check

GOOD = {
    "compare": {"model": {"name": "tiny"}, "protocol": {"kind": "causal-lm", "text": "t", "window": 8, "windows": 1},
                "reference": {"weight_bytes": 100, "ppl": 10.0},
                "results": [{"format": "nf4", "bits_per_weight": 4.5, "kl_mean": 0.2, "top1": 0.9,
                             "layer_formats": {"nf4": 2}},
                            {"format": "mix", "bits_per_weight": 6.0, "kl_mean": 0.05,
                             "layer_formats": {"nf4": 1, "int8": 1}}]},
    "bench": {"rows": [{"format": "bitsandbytes nf4/64", "peer": True, "bits_per_weight": 4.5, "kl_mean": 0.26}],
              "llama_cpp": [{"format": "Q4_K_M (llama.cpp)", "bits_per_weight": 5.5, "kl_mean": 0.03}]},
    "errors": {"layers": [{"name": "model.layers.0.mlp.down_proj"}],
               "formats": [{"format": "nf4", "bits_per_weight": 4.5, "mean_sqnr_db": 20.0, "min_sqnr_db": 20.0,
                            "min_layer": "model.layers.0.mlp.down_proj", "layers": [{"sqnr_db": 20.0}]}]},
    "outliers": {"threshold": 6.0, "features": [], "systematic": [], "hidden_inputs": [],
                 "layers": [{"name": "model.layers.0.mlp.down_proj", "dims": [{"dim": 3}]}]},
    "plan": {"name": "p", "rules": [{"pattern": "mlp.*", "format": "int8"}, {"pattern": "*", "format": "nf4"}]},
    "saved": {"lowbit_layout": 1, "config": {"label": "nf4"},
              "layers": {"model.layers.0.mlp.down_proj": {"format": "nf4", "block_size": 64, "label": "nf4"}}},
    "sensitivity": {"candidates": ["nf4", "int8"], "anchor": "nf4",
                    "layers": [{"name": "model.layers.0.mlp.down_proj", "numel": 8192,
                                "costs": {"nf4": {"bytes": 4608}}}]},
}

# (kind, a change as (JSON path as keys, new value), the expected message tail)
BROKEN = [
    ("compare", (("results", 0, "bits_per_weight"), "x"),
     "results[0].bits_per_weight is the string 'x', expected a finite number"),
    ("compare", (("results", 0, "kl_mean"), [1]), "results[0].kl_mean is an array, expected a finite number or null"),
    ("compare", (("results",), [1, 2]), "results[0] is the number 1, expected an object"),
    ("compare", (("results", 1, "layer_formats", "nf4"), "1"),
     "results[1].layer_formats.nf4 is the string '1', expected a layer count"),
    ("compare", (("results", 1, "layer_formats", "nf4"), 10**9),
     "results[1].layer_formats.nf4 is the number 1000000000, expected a layer count from 0 to 100,000"),
    ("compare", (("results", 0, "format"), None), "results[0].format is null, expected a string"),
    ("compare", (("model",), []), "model is an array, expected an object"),
    ("compare", (("protocol", "windows"), 1.5), "protocol.windows is the number 1.5, expected an integer"),
    ("compare", (("reference", "weight_bytes"), True), "reference.weight_bytes is true, expected a finite number"),
    ("bench", (("rows", 0, "peer"), "yes"), "rows[0].peer is the string 'yes', expected true or false"),
    ("bench", (("llama_cpp", 0, "bits_per_weight"), {}), "llama_cpp[0].bits_per_weight is an object"),
    ("errors", (("formats", 0, "layers", 0, "sqnr_db"), "20"), "formats[0].layers[0].sqnr_db is the string '20'"),
    ("errors", (("layers", 0), "model.layers.0"), "layers[0] is the string 'model.layers.0', expected an object"),
    ("outliers", (("threshold",), "6"), "threshold is the string '6', expected a finite number"),
    ("outliers", (("layers", 0, "dims", 0, "dim"), 3.5), "layers[0].dims[0].dim is the number 3.5"),
    ("plan", (("rules", 0, "pattern"), 7), "rules[0].pattern is the number 7, expected a string"),
    ("saved", (("layers", "model.layers.0.mlp.down_proj", "format"), ["nf4"]),
     "layers.model.layers.0.mlp.down_proj.format is an array, expected a string"),
    ("sensitivity", (("layers", 0, "numel"), 0), "layers[0].numel is the number 0, expected a whole number >= 1"),
]

# the command reading each kind (the file is FILE; the other inputs are good files)
COMMANDS = {
    "compare": [["report", "FILE", "-o", "OUT.html"], ["plot", "kl", "FILE", "-o", "OUT.png"],
                ["plot", "plan", "FILE", "-o", "OUT.png"]],
    "bench": [["plot", "kl", "FILE", "-o", "OUT.png"], ["plot", "kl", "COMPARE", "--peers", "FILE", "-o", "OUT.png"],
              ["report", "COMPARE", "--peers", "FILE", "-o", "OUT.html"],
              ["compare", "--formats", "nf4", "--report", "OUT.html", "--peers", "FILE"]],
    "errors": [["plot", "errors", "FILE", "-o", "OUT.png"]],
    "outliers": [["plot", "outliers", "FILE", "-o", "OUT.png"]],
    "plan": [["plot", "plan", "FILE", "-o", "OUT.png"]],
    "saved": [["plot", "plan", "FILE", "-o", "OUT.png"]],
    "sensitivity": [["plot", "plan", "PLAN", "--sensitivity", "FILE", "-o", "OUT.png"]],
}


def broken(kind, change):
    data = copy.deepcopy(GOOD[kind])
    keys, value = change
    target = data
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return data


@pytest.mark.parametrize("kind", list(GOOD))
def test_good_files_pass(kind):
    check(GOOD[kind], SCHEMAS[kind], "f.json")


@pytest.mark.parametrize(("kind", "change", "message"), BROKEN)
def test_schema_names_the_path_and_what_belongs_there(kind, change, message):
    with pytest.raises(InputError) as e:
        check(broken(kind, change), SCHEMAS[kind], "f.json")
    assert str(e.value).startswith("f.json: ") and message in str(e.value) and "\n" not in str(e.value)


def test_required_fields():
    for kind, data, message in [("compare", {"results": [{"bits_per_weight": 4}]}, "results[0].format is missing"),
                                ("errors", {"layers": [], "formats": [{"format": "nf4"}]},
                                 "formats[0].bits_per_weight is missing")]:
        with pytest.raises(InputError, match=re.escape(message)):
            check(data, SCHEMAS[kind], "f.json")
    check({"layers": [], "formats": [{"format": "nf4", "error": "no"}]}, SCHEMAS["errors"], "f.json")  # failed


@pytest.mark.parametrize(("kind", "change", "message"), BROKEN)
def test_every_command_says_it_in_one_line_and_writes_nothing(kind, change, message, tmp_path, capsys):
    paths = {"COMPARE": GOOD["compare"], "PLAN": GOOD["plan"], "FILE": broken(kind, change)}
    for name, data in paths.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(data))
    for command in COMMANDS[kind]:
        args = [str(tmp_path / (f"{a}.json" if a in paths else a)) if a.isupper() else a for a in command]
        capsys.readouterr()
        assert main(args) == 2, command
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"FILE.json: {message}" in err, (command, err)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"{n}.json" for n in paths)


def test_an_errors_report_with_a_layer_missing(tmp_path, capsys):
    data = broken("errors", (("formats", 0, "layers"), []))
    (tmp_path / "e.json").write_text(json.dumps(data))
    assert main(["plot", "errors", str(tmp_path / "e.json"), "-o", str(tmp_path / "e.png")]) == 2
    assert "format 'nf4' of this errors report has not one entry per layer of its 1" in capsys.readouterr().err
    assert not (tmp_path / "e.png").exists()


def test_json_nan_is_not_a_number(tmp_path, capsys):
    """Python's json reads NaN and Infinity, which no lowbit writer writes (write_json makes them null)."""
    path = tmp_path / "r.json"
    path.write_text('{"results": [{"format": "nf4", "bits_per_weight": NaN, "kl_mean": 0.1}]}')
    assert main(["plot", "kl", str(path), "-o", str(tmp_path / "kl.png")]) == 2
    assert "results[0].bits_per_weight is the number nan, expected a finite number" in capsys.readouterr().err
