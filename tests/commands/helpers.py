"""What the command tests share: lowbit run in a fresh interpreter or in this one, and the one-line error check."""

import subprocess
import sys

from lowbit.cli import main


def lowbit(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "lowbit.cli", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd)


def run_main(capsys, *args):
    """``lowbit`` run in this process, as a CompletedProcess: no interpreter start (~4 s) per call."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in args])
    except SystemExit as e:  # argparse's usage errors
        code = e.code
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_one_line_error(r, *needles):
    """Exit 2 and one error line; other stderr lines may only be progress ("lowbit: ..." without a terminal)."""
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert "Traceback" not in r.stderr and lines and " error: " in lines[-1], r.stderr
    assert all(line.startswith("lowbit: ") for line in lines[:-1]), r.stderr
    for needle in needles:
        assert needle in r.stderr, r.stderr
