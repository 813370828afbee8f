"""`lowbit sensitivity` and `lowbit quantize --budget`: the table, the plan under the budget, saved and scored."""

import json
import re

from lowbit.io import load_quantized
from lowbit.layers import QuantLinear
from lowbit.planning.sensitivity import Sensitivity

from .helpers import assert_one_line_error
from .helpers import run_main as run

TINY = ["--window", "64", "--windows", "1"]



def test_sensitivity_then_a_budget_plan_saved_reloaded_and_scored(tiny_lm_dir, tmp_path, capsys):
    table, out = tmp_path / "s.json", tmp_path / "q"
    r = run(capsys, "sensitivity", "--model", tiny_lm_dir, "--formats", "int3,int4,int8", "--calibrate", "2", *TINY,
               "--json", table)
    assert r.returncode == 0, r.stderr
    s = Sensitivity.load(table)
    assert s.anchor == "int4" and len(s.numel) == 14 and s.windows == 2
    assert "model.layers.1.mlp.down_proj" in r.stdout and "~" in r.stdout  # predicted cells are marked
    r = run(capsys, "quantize", "--model", tiny_lm_dir, "--budget", "5", "--candidates", "int3,int4,int8",
               "--sensitivity", table, *TINY, "-o", out)
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert "plan for 5 bits per weight" in text and "predicted (the layers' KL added up)" in text
    model, _, meta = load_quantized(out)
    layers = {n: m.qweight for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(meta["plan"]["rules"]) == len(layers) == 14
    assert meta["quantize"]["bits_per_weight"] <= 5
    assert 8 * sum(q.nbytes for q in layers.values()) / sum(q.numel for q in layers.values()) <= 5
    assert len({q.format.name for q in layers.values()}) > 1  # 5 bits: some int8 layers, some int3 or int4
    r = run(capsys, "eval", out, *TINY, "--json", tmp_path / "e.json")
    assert r.returncode == 0, r.stderr
    said = float(re.search(r"KL mean ([0-9.]+) measured", text).group(1))  # the saved model, block by block
    assert said == round(json.loads((tmp_path / "e.json").read_text())["results"][0]["kl_mean"], 5)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps(meta["plan"]))
    r = run(capsys, "quantize", "--model", tiny_lm_dir, "--plan", plan, *TINY, "-o", tmp_path / "p")
    assert r.returncode == 0, r.stderr
    for f in ("model.safetensors", "tokenizer.json"):  # the plan it chose, quantized as any plan is
        assert (tmp_path / "p" / f).read_bytes() == (out / f).read_bytes()


def made_up_table(tiny_lm_dir, path, file_hash=None):
    """A sensitivity table naming the tiny model's layers (KL made up): refusals need no measurement."""
    from lowbit.layers.surgery import linears
    from lowbit.models import load_model
    from lowbit.planning.sensitivity import LayerCost

    model, _, info = load_model(str(tiny_lm_dir))
    numel = {names[0]: m.weight.numel() for names, m in linears(model) if "lm_head" not in names[0]}
    costs = {name: {"int3": LayerCost(n * 7 // 16, 1.0, 0.1, True), "int8": LayerCost(n * 17 // 16, 0.01, 0.001, False)}
             for name, n in numel.items()}
    table = Sensitivity(("int3", "int8"), "int3", 1, numel, costs, model={"file_hash": file_hash or info.file_hash})
    table.save(path)


def test_budget_refusals_are_one_line(tiny_lm_dir, tmp_path, capsys):
    table = tmp_path / "s.json"
    made_up_table(tiny_lm_dir, table)
    assert_one_line_error(run(capsys, "quantize", "--model", tiny_lm_dir, "--budget", "2", "--candidates", "int3,int8",
                                 "--sensitivity", table, *TINY, "-o", tmp_path / "a"),
                          "below the smallest mix of the candidates: 3.5000 bits per weight")
    assert_one_line_error(run(capsys, "quantize", "--model", tiny_lm_dir, "--budget", "4", "--candidates", "nf4",
                                 "--sensitivity", table, *TINY, "-o", tmp_path / "b"),
                          "candidate nf4 is not in the sensitivity table")
    made_up_table(tiny_lm_dir, table, file_hash="0" * 64)
    assert_one_line_error(run(capsys, "quantize", "--model", tiny_lm_dir, "--budget", "4", "--candidates", "int3,int8",
                                 "--sensitivity", table, *TINY, "-o", tmp_path / "c"), "measured on another model")
    assert_one_line_error(run(capsys, "quantize", "--model", tiny_lm_dir, "--format", "int4", "--candidates", "int3",
                                 "-o", tmp_path / "d"), "there is no --budget")
    assert_one_line_error(run(capsys, "quantize", "--model", tiny_lm_dir, "--budget", "-1", "-o", tmp_path / "e"),
                          "positive number")
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_sensitivity_refuses_an_encoder(capsys):
    assert_one_line_error(run(capsys, "sensitivity", "--model", "minilm", *TINY), "encoder")
