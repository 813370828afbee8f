"""`lowbit quantize --plan`: per-layer formats saved, reloaded exactly and shown by `lowbit eval`."""

import json

import pytest

from lowbit.io import load_quantized
from lowbit.layers import QuantLinear

from .helpers import assert_one_line_error, lowbit
from .helpers import run_main as run

TINY = ["--window", "64", "--windows", "1"]
# the tiny Llama's rows hold 64 or 128 weights: never a whole 256-weight q4_k block, so q4_k falls back
PLAN = {"rules": [{"pattern": "lm_head", "keep": True},
                  {"pattern": "mlp.down_proj", "format": "q4_k", "fallback": "q8_0"},
                  {"pattern": "*", "format": "nf4/32"}]}


def test_quantize_with_a_plan_saves_reloads_and_reports_fallbacks(tiny_lm_dir, tmp_path, capsys):
    plan, out = tmp_path / "plan.json", tmp_path / "q"
    plan.write_text(json.dumps(PLAN))
    r = run(capsys, "quantize", "--model", tiny_lm_dir, "--plan", plan, "-o", out)
    assert r.returncode == 0, r.stderr
    assert "2 fell back from q4_k" in r.stdout
    model, _, meta = load_quantized(out)
    assert meta["plan"] == PLAN
    layers = {n: m.qweight for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert len(layers) == 14  # 7 per decoder layer; lm_head kept
    for name, q in layers.items():
        assert (q.format.name, q.block_size) == (("q8_0", 32) if name.endswith("down_proj") else ("nf4", 32))
        assert meta["layers"][name].get("fallback_from") == ("q4_k" if name.endswith("down_proj") else None)
    stored = sum(q.nbytes for q in layers.values())
    assert abs(meta["quantize"]["bits_per_weight"] - 8 * stored / sum(q.numel for q in layers.values())) < 1e-12
    r = run(capsys, "eval", out, *TINY)
    assert r.returncode == 0, r.stderr
    assert "12 nf4/32, 2 q8_0; 2 fell back from q4_k" in r.stdout.replace("\n", " ")


def test_plan_refusals_are_one_line(tiny_lm_dir, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"rules": [{"pattern": "*", "format": "q4_k"}]}))
    assert_one_line_error(run(capsys, "quantize", "--model", tiny_lm_dir, "--plan", plan, "-o", tmp_path / "a"), "q4_k")
    assert not (tmp_path / "a").exists()
    plan.write_text("{")
    assert_one_line_error(run(capsys, "quantize", "--model", tiny_lm_dir, "--plan", plan, "-o", tmp_path / "b"),
                          "not valid JSON")
    r = run(capsys, "quantize", "--model", tiny_lm_dir, "--plan", plan, "--format", "nf4", "-o", tmp_path / "c")
    assert r.returncode == 2 and "not allowed with argument" in r.stderr
    plan.write_text(json.dumps(PLAN))
    assert_one_line_error(run(capsys, "quantize", "--model", tiny_lm_dir, "--plan", plan, "--exclude", "x",
                                 "-o", tmp_path / "d"), "belong in its rules")


@pytest.mark.slow  # two quantize subprocesses: ~55 s
def test_a_rule_matching_no_layer_warns_or_fails_with_strict(tiny_lm_dir, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"rules": [{"pattern": "mlp.dwn_proj", "format": "int8"},
                                          {"pattern": "*", "format": "nf4"}]}))
    r = lowbit("quantize", "--model", tiny_lm_dir, "--plan", plan, "-o", tmp_path / "a")
    assert r.returncode == 0, r.stderr
    out = " ".join(r.stdout.split())  # rich wraps long lines
    assert "warning: plan rule 'mlp.dwn_proj' matches no nn.Linear layer; closest names: mlp.down_proj" in out
    assert_one_line_error(lowbit("quantize", "--model", tiny_lm_dir, "--plan", plan, "--strict", "-o", tmp_path / "b"),
                          "matches no nn.Linear layer", "--strict")
    assert not (tmp_path / "b").exists()


def test_compare_scores_a_plan_and_shows_its_layers(tiny_lm_dir, tmp_path, capsys):
    plan, out = tmp_path / "plan.json", tmp_path / "r.json"
    plan.write_text(json.dumps({"name": "mixed", **PLAN}))
    r = run(capsys, "compare", "--model", tiny_lm_dir, "--plan", plan, *TINY, "--json", out)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["format"] == "mixed" and row["layer_formats"] == {"nf4/32": 12, "q8_0": 2}
    assert "mixed: 12 nf4/32, 2 q8_0; 2 fell back from q4_k" in " ".join(r.stdout.split())
