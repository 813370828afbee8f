import subprocess
import sys

import lowbit
from lowbit.cli import main


def test_formats_lists_every_format(capsys):
    assert main(["formats"]) == 0
    out = capsys.readouterr().out
    for name in lowbit.formats():
        assert name in out


def test_formats_code_table(capsys):
    assert main(["formats", "nf4"]) == 0
    out = capsys.readouterr().out
    assert "0111" in out and "-0.696192801" in out and "1111" in out


def test_unknown_format_is_one_line_exit_2():
    r = subprocess.run([sys.executable, "-m", "lowbit.cli", "formats", "nf44"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "did you mean nf4" in r.stderr
    assert "Traceback" not in r.stderr
