"""`lowbit formats`, `lowbit formats LABEL` and `lowbit bits VALUE` print, byte for byte, what they printed
when they quantized a probe tensor and rounded through the torch codecs (issue 25, deliverable 5: they now
start without torch and read the format facts instead).

golden/fast_commands.json.gz: argv -> exit status, stdout, stderr, captured from ``lowbit ARGV`` (no
terminal, no COLUMNS: 140 columns) at commit 0659749, before the change, for the format table, every
registered format, label variants (block, +dq, LLM.int8(), aliases, searches, errors) and `lowbit bits` of
zeros, signs, subnormals, overflow, nan, inf, huge exponents and ratios in every explained format.
"""

import gzip
import json
from pathlib import Path

import pytest

from lowbit.cli import main

GOLDEN = json.loads(gzip.decompress((Path(__file__).parent / "golden" / "fast_commands.json.gz").read_bytes()))


@pytest.mark.parametrize("argv", list(GOLDEN))
def test_output_is_unchanged(argv, capsys, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)  # rich's width without a terminal: console() gives 140
    expected = GOLDEN[argv]
    rc = main(argv.split(" "))
    out, err = capsys.readouterr()
    assert (rc, out, err) == (expected["rc"], expected["stdout"], expected["stderr"])
