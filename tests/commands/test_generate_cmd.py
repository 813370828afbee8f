"""lowbit generate: a saved quantized model or one quantized in memory, and its one-line errors."""

import pytest

from lowbit.cli import main

from .helpers import run_main


def test_generate_from_a_saved_directory(tiny_lm_dir, tmp_path, capsys):
    q = tmp_path / "q"
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "q4_0", "-o", str(q)]) == 0
    r = run_main(capsys, "generate", q, "--prompt", "Hello", "--max-new-tokens", "5", "--temperature", "0.8",
                 "--top-k", "20", "--seed", "1")
    assert r.returncode == 0, r.stderr
    assert "5 tokens" in r.stdout and "decode" in r.stdout and "tokens/s" in r.stdout


def test_generate_quantizes_the_embedded_model_in_memory(capsys):
    r = run_main(capsys, "generate", "--format", "int8", "--include-head", "--prompt", "The capital of France is",
                 "--max-new-tokens", "4", "--threads", "2")
    assert r.returncode == 0, r.stderr
    assert "Paris" in r.stdout and "native step" in r.stdout


@pytest.mark.parametrize("args,message", [
    (["DIR", "--model", "minilm"], "not both"),
    (["--include-head"], "goes with --format"),
    (["--max-new-tokens", "0"], "must be a whole number from 1 to 131,072"),
    (["--top-p", "1.5"], "(0, 1]"),
    (["--model", "minilm"], "not a causal language model"),
    (["--format", "nf4+gptq"], "needs calibration"),
])
def test_bad_requests_are_one_line_errors(args, message, tmp_path, capsys):
    args = [str(tmp_path) if a == "DIR" else a for a in args]
    r = run_main(capsys, "generate", *args, "--prompt", "hi")
    last = r.stderr.strip().splitlines()[-1]  # after at most a "loading" note
    assert r.returncode == 2 and last.startswith("lowbit generate: error:") and message in last, r.stderr
