"""`lowbit sensitivity` and `lowbit quantize --budget`: the table, the plan under the budget, saved and scored."""

import json

from test_model_cmds import assert_one_line_error, lowbit

from lowbit.io import load_quantized
from lowbit.nn import QuantLinear
from lowbit.nn.sensitivity import Sensitivity

TINY = ["--window", "64", "--windows", "1"]


def test_sensitivity_then_a_budget_plan_saved_reloaded_and_scored(tiny_lm_dir, tmp_path):
    table, out = tmp_path / "s.json", tmp_path / "q"
    r = lowbit("sensitivity", "--model", tiny_lm_dir, "--formats", "int3,int4,int8", "--calibrate", "2", *TINY,
               "--json", table)
    assert r.returncode == 0, r.stderr
    s = Sensitivity.load(table)
    assert s.anchor == "int4" and len(s.numel) == 14 and s.windows == 2
    assert "model.layers.1.mlp.down_proj" in r.stdout and "~" in r.stdout  # predicted cells are marked
    r = lowbit("quantize", "--model", tiny_lm_dir, "--budget", "5", "--candidates", "int3,int4,int8",
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
    r = lowbit("eval", out, *TINY)
    assert r.returncode == 0, r.stderr


def test_budget_refusals_are_one_line(tiny_lm_dir, tmp_path):
    table = tmp_path / "s.json"
    s = lowbit("sensitivity", "--model", tiny_lm_dir, "--formats", "int3,int8", "--calibrate", "1", *TINY,
               "--json", table)
    assert s.returncode == 0, s.stderr
    assert_one_line_error(lowbit("quantize", "--model", tiny_lm_dir, "--budget", "2", "--candidates", "int3,int8",
                                 "--sensitivity", table, *TINY, "-o", tmp_path / "a"),
                          "below the smallest mix of the candidates: 3.5000 bits per weight")
    assert not (tmp_path / "a").exists()
    assert_one_line_error(lowbit("quantize", "--model", tiny_lm_dir, "--budget", "4", "--candidates", "nf4",
                                 "--sensitivity", table, *TINY, "-o", tmp_path / "b"),
                          "candidate nf4 is not in the sensitivity table")
    other = json.loads(table.read_text())
    other["model"]["file_hash"] = "0" * 64
    table.write_text(json.dumps(other))
    assert_one_line_error(lowbit("quantize", "--model", tiny_lm_dir, "--budget", "4", "--candidates", "int3,int8",
                                 "--sensitivity", table, *TINY, "-o", tmp_path / "c"), "measured on another model")
    assert_one_line_error(lowbit("quantize", "--model", tiny_lm_dir, "--format", "int4", "--candidates", "int3",
                                 "-o", tmp_path / "d"), "there is no --budget")
    assert_one_line_error(lowbit("quantize", "--model", tiny_lm_dir, "--budget", "-1", "-o", tmp_path / "e"),
                          "positive number")
    assert_one_line_error(lowbit("sensitivity", "--model", "minilm", *TINY), "encoder")
    assert not any((tmp_path / x).exists() for x in "bcde")
