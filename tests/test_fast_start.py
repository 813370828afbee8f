"""Commands that load no model start without torch or transformers (issue 25, deliverable 5).

Each runs in a fresh interpreter, and what it imported is checked, not how long it took: `import
torch` alone takes about 1.3 s (it brings torch's compiler stack: fx, export, _dynamo's decompositions),
so a command that imports it cannot answer in under a second.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers")

COMPARE = {"model": {"name": "tiny"}, "protocol": {"kind": "causal-lm", "text": "pydoc_data.topics", "window": 512,
                                                   "windows": 16},
           "reference": {"weight_bytes": 538_100_000, "ppl": 14.937}, "results": [
    {"format": "int8", "bits_per_weight": 8.5, "kl_mean": 0.0014, "layer_formats": {"int8": 14}},
    {"format": "nf4", "bits_per_weight": 4.5, "kl_mean": 0.26, "layer_formats": {"nf4": 14}}]}
ERRORS = {"model": {"name": "tiny"}, "layers": [{"name": "model.layers.0.mlp.down_proj", "shape": [64, 128]}],
          "formats": [{"format": "nf4", "bits_per_weight": 4.5, "mean_sqnr_db": 20.1, "min_sqnr_db": 20.1,
                       "min_layer": "model.layers.0.mlp.down_proj", "gaussian_bound_db": 27.1,
                       "layers": [{"mse": 1e-6, "sqnr_db": 20.1, "max_abs": 0.01, "rel_frobenius": 0.1}]}]}

RUN = """
import sys
import lowbit.cli
try:
    code = lowbit.cli.main(sys.argv[1:])
except SystemExit as e:  # --version, --help
    code = e.code
print("\\nimported:", *[m for m in {heavy!r} if m in sys.modules])
sys.exit(code)
"""


def run_lowbit(*argv, cwd):
    """``lowbit ARGV`` in a fresh interpreter: (exit status, the heavy modules it imported, output)."""
    out = subprocess.run([sys.executable, "-c", RUN.format(heavy=HEAVY), *argv], capture_output=True, text=True,
                         cwd=cwd, env={"PATH": "/usr/bin:/bin", "LOWBIT_CACHE": str(cwd / "cache"), "COLUMNS": "120"})
    last = out.stdout.rstrip().rpartition("\n")[2]
    assert last.startswith("imported:"), out.stdout + out.stderr
    return out.returncode, last.split()[1:], out.stdout + out.stderr


@pytest.fixture
def results(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps(COMPARE))
    (tmp_path / "e.json").write_text(json.dumps(ERRORS))
    return tmp_path


@pytest.mark.parametrize("argv", [
    ["--version"],
    ["--help"],
    ["memory", "--params", "70B"],
    ["memory", "--params", "8e9"],
    ["cache"],
    ["cache", "list"],
    ["report", "c.json", "-o", "r.html"],
    ["plot", "kl", "c.json", "-o", "kl.png"],
    ["plot", "errors", "e.json", "-o", "e.svg"],
])
def test_command_imports_no_torch(argv, results):
    code, heavy, output = run_lowbit(*argv, cwd=results)
    assert code == 0, output
    assert heavy == [], f"lowbit {' '.join(argv)} imported {heavy}"


# formats and bits read the format facts (formats.catalog, .facts, .levels, .one_value; tests/commands/
# test_fast_commands_golden.py: the same output as when they quantized with the torch codecs) and each codec's
# field description (Codec.ANATOMY: the codec modules import torch only in the functions that compute)
@pytest.mark.parametrize("argv", [["formats"], ["formats", "nf4"], ["formats", "q4_0"], ["formats", "int4/128+dq"],
                                  ["formats", "mxfp4"], ["formats", "nvfp4"], ["formats", "fp8_e4m3fn"],
                                  ["formats", "qq4"], ["formats", "fp16"], ["formats", "tf32"],
                                  ["formats", "int8_outlier/3.5"], ["bits", "3.14"],
                                  ["bits", "3.1415926535", "--formats", "fp16"], ["bits", "-0", "--formats",
                                  "int4,nf2,bnb_fp4,fp4_e3m0,ternary,bf16"], ["bits", "1e10000000"]])
def test_format_commands_import_no_torch(argv, tmp_path):
    code, heavy, output = run_lowbit(*argv, cwd=tmp_path)
    assert code == 0, output
    assert heavy == [], f"lowbit {' '.join(argv)} imported {heavy}"
