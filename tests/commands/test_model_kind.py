"""Issue 25, finding 8: causal LM or encoder, decided from config.json's model_type when it names no
architectures (lowbit's own quantize and import outputs wrote none)."""

import json
import shutil

import pytest

from lowbit.models.loader import CAUSAL_LM, ENCODER, load_model, model_kind

from .helpers import run_main


@pytest.mark.parametrize("config,kind", [
    ({"model_type": "llama"}, CAUSAL_LM),
    ({"model_type": "gpt2"}, CAUSAL_LM),
    ({"model_type": "bert"}, ENCODER),  # transformers maps it to a masked-LM head too: an encoder by default
    ({"model_type": "bert", "is_decoder": True}, CAUSAL_LM),
    ({"model_type": "t5"}, ENCODER),  # no causal-LM class
    ({"model_type": "no-such-type"}, ENCODER),
    ({}, ENCODER),
    ({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}, CAUSAL_LM),
    ({"model_type": "llama", "architectures": ["LlamaModel"]}, ENCODER),  # the saved head wins
    ({"model_type": "bert", "architectures": ["BertModel"]}, ENCODER),
    ({"model_type": "llama", "architectures": []}, CAUSAL_LM),
])
def test_model_kind(config, kind):
    assert model_kind(config) == kind


@pytest.fixture(scope="module")
def no_architectures(tiny_lm_dir, tmp_path_factory):
    """tiny_lm_dir with "architectures" removed from its config.json."""
    path = tmp_path_factory.mktemp("kind") / "llama"
    shutil.copytree(tiny_lm_dir, path)
    config = json.loads((path / "config.json").read_text())
    del config["architectures"]
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_a_llama_without_architectures_is_a_causal_lm(no_architectures, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    assert load_model(no_architectures)[2].kind == CAUSAL_LM
    out = tmp_path / "r.json"
    r = run_main(capsys, "compare", "--model", no_architectures, "--formats", "int8", "--window", "64",
                 "--windows", "1", "--json", out)
    assert r.returncode == 0, r.stderr
    report = json.loads(out.read_text())
    (row,) = report["results"]
    assert "kl_mean" in row and "cos_dist_mean" not in row  # scored by KL, not 1 - cos
    assert report["protocol"]["windows"] == 1 and row["tokens"] == 63  # one window, not 95 paragraphs
    r = run_main(capsys, "generate", "--model", no_architectures, "--format", "int8", "--prompt", "Hello",
                 "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr


def test_quantize_output_names_its_architecture(no_architectures, tmp_path, capsys):
    q = tmp_path / "q"
    r = run_main(capsys, "quantize", "--model", no_architectures, "--format", "int8", "-o", q)
    assert r.returncode == 0, r.stderr
    assert json.loads((q / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert json.loads((q / "lowbit.json").read_text())["model"]["kind"] == CAUSAL_LM
    r = run_main(capsys, "generate", q, "--prompt", "Hello", "--max-new-tokens", "2")
    assert r.returncode == 0, r.stderr
