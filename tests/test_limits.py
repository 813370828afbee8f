"""Issue 25: no input makes lowbit compute without bound (findings 7, 10, 17 and deliverable 2).

Every number a user gives has a range (lowbit.limits, docs/limits.md) that is checked as the arguments are read:
one line, exit 2, before any model loads (the tests name a model that does not exist, so a check that came after
the load would say so instead), nothing written.
"""

import os
import subprocess
import sys
import time

import pytest

from lowbit import limits as L
from lowbit.cli import main

from .commands.helpers import assert_one_line_error, run_main

NO_MODEL = "/nonexistent/model"


def one_line(r, *needles):
    assert_one_line_error(r, *needles)
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr  # not argparse's usage block either
    assert r.stdout == ""


@pytest.mark.parametrize("args, needle", [
    # finding 7: --threads 100000 segfaulted (exit 139), --threads 10000 took 88 s for 2 tokens
    (["--threads", "100000"], f"--threads: must be a whole number from 1 to {L.THREADS.high}"),
    (["--threads", "10000"], "(4 x the usable CPUs)"),
    (["--threads", "0"], "--threads: must be a whole number from 1"),
    # finding 10: a NaN temperature reached torch.multinomial; a seed past 2**64 overflowed torch's
    (["--temperature", "nan"], "--temperature: must be a number 0 or in [1e-06, 100]"),
    (["--temperature", "inf"], "--temperature: must be a number"),
    (["--temperature", "1e-40"], "--temperature: must be a number"),  # logits / T overflow float32
    (["--temperature", "-1"], "--temperature: must be a number"),
    (["--seed", "99999999999999999999999"], "--seed: must be a whole number from 0 to 18,446,744,073,709,551,615"),
    (["--seed", "-1"], "--seed: must be a whole number from 0"),
    (["--seed", "9" * 5000], "--seed: must be a whole number"),  # read without int() of 5000 digits
    (["--top-k", "0"], "--top-k: must be a whole number from 1 to 1,048,576"),
    (["--top-p", "nan"], "--top-p: must be a number in (0, 1]"),
    (["--max-new-tokens", "1000000"], "--max-new-tokens: must be a whole number from 1 to 131,072"),
    (["--max-new-tokens", "1e3"], "--max-new-tokens: must be a whole number"),
])
def test_generate_numbers_are_checked_before_the_model_loads(args, needle, tmp_path, capsys):
    r = run_main(capsys, "generate", "--model", NO_MODEL, "--prompt", "hi", *args)
    one_line(r, needle, "(see lowbit generate --help)")


def test_a_prompt_that_is_not_utf8_is_one_line(tmp_path):
    # finding 10: argv bytes that are not UTF-8 arrive as lone surrogates; tokenizers raised a TypeError
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "generate", "--model", NO_MODEL, "--prompt",
                        b"caf\xe9 au lait"], capture_output=True, text=True, errors="replace", cwd=tmp_path)
    one_line(r, "--prompt is not valid UTF-8 (byte 0xe9 at character 3)")
    assert os.listdir(tmp_path) == []


def test_a_surrogate_prompt_in_process_is_one_line(capsys):
    r = run_main(capsys, "generate", "--model", NO_MODEL, "--prompt", "hi \udcff")
    one_line(r, "--prompt is not valid UTF-8 (byte 0xff at character 3)")


@pytest.mark.parametrize("command, args, needle", [
    ("compare", ["--window", "1"], "--window: must be a whole number from 2 to 131,072"),
    ("compare", ["--window", "99999999999999999999"], "--window: must be a whole number from 2 to 131,072"),
    ("compare", ["--windows", "0"], "--windows: must be a whole number from 1 to 100,000"),
    ("compare", ["--formats", "nf4@amse", "--calibrate", "1000000"], "--calibrate: must be a whole number"),
    ("eval", ["--windows", "-3", "DIR"], "--windows: must be a whole number from 1"),
    ("sensitivity", ["--calibrate", "0"], "--calibrate: must be a whole number from 1 to 100,000"),
    ("outliers", ["--calibrate", "1e9"], "--calibrate: must be a whole number"),
    ("errors", ["--calibrate", "0"], "--calibrate: must be a whole number"),
    ("memory", ["--params", "7B", "--context", "0", "--layers", "1", "--kv-heads", "1", "--head-dim", "1"],
     "--context: must be a whole number from 1 to 16,777,216"),
    ("memory", ["--params", "7B", "--context", "8", "--layers", "1", "--kv-heads", "1", "--head-dim", "1e9"],
     "--head-dim: must be a whole number from 1 to 65,536"),
])
def test_counts_out_of_range_are_one_line_before_anything_loads(command, args, needle, tmp_path, capsys):
    args = [str(tmp_path / "d") if a == "DIR" else a for a in args]
    model = ["--model", NO_MODEL] if command not in ("eval", "memory") else []
    r = run_main(capsys, command, *model, *args, *(["--json", str(tmp_path / "out.json")]))
    one_line(r, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("label", ["nf4/99999999999999999999", "int4/1048577"])
def test_a_block_size_past_the_range_is_one_line(label, capsys):
    # nf4/99999999999999999999 was an internal error: "Overflow when unpacking long long" in torch's view()
    r = run_main(capsys, "formats", label)
    one_line(r, "block size", "1,048,576")


def test_help_shows_the_ranges(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in ("from 1 to 131,072", "0 or in [1e-06, 100]", "from 0 to 18,446,744,073,709,551,615",
                 f"from 1 to {L.THREADS.high}"):
        assert text in out, text


# --- finding 17: --text that is a device, a FIFO, or too large --------------------------------------------------

def test_text_from_dev_zero_is_refused_at_once(tmp_path):
    # "text file does not exist" although it exists; reading it would never end
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "compare", "--model", NO_MODEL, "--text", "/dev/zero",
                        "--json", str(tmp_path / "out.json")], capture_output=True, text=True, timeout=120)
    one_line(r, "--text names a character device, not a regular file: /dev/zero", "may never end")
    assert time.perf_counter() - start < 60 and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("special", ["/dev/urandom", "fifo"])
def test_text_from_a_device_or_fifo_is_refused(special, tmp_path, capsys):
    if special == "fifo":
        special = tmp_path / "pipe"
        os.mkfifo(special)  # opening it to read would block until a writer came
    kind = "a FIFO (named pipe)" if special != "/dev/urandom" else "a character device"
    r = run_main(capsys, "compare", "--model", NO_MODEL, "--text", special)
    one_line(r, f"--text names {kind}, not a regular file")


@pytest.mark.parametrize("args, needle", [
    (["--budget", "0"], "--budget: must be a number in (0, 32]"),
    (["--budget", "1e400"], "--budget: must be a number in (0, 32]"),
    (["--format", "nf4", "--block-size", "0"], "--block-size: must be a whole number from 1"),
    (["--format", "nf4@amse", "--window", "1"], "--window: must be a whole number from 2"),
    (["--format", "nf4@amse", "--windows", "0"], "--windows: must be a whole number from 1"),
])
def test_quantize_numbers_are_checked_before_the_model_loads(args, needle, tmp_path, capsys):
    r = run_main(capsys, "quantize", "--model", NO_MODEL, *args, "-o", str(tmp_path / "q"))
    one_line(r, needle)
    assert list(tmp_path.iterdir()) == []
