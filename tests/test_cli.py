"""The `lowbit` command line itself: the table of subcommands and how a failure ends (issue 25, deliverable 4)."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from lowbit import cli
from lowbit.commands import formats_cmd
from lowbit.errors import InputError


def test_help_lists_every_command_with_its_help():
    out = subprocess.run([sys.executable, "-m", "lowbit.cli", "--help"], capture_output=True, text=True, check=True)
    listed = " ".join(out.stdout.split())  # argparse wraps the help column
    for name, _, help in cli.COMMANDS:
        assert f"{name} {' '.join(help.split())}" in listed, name


@pytest.mark.parametrize(("name", "module"), [(name, module) for name, module, _ in cli.COMMANDS])
def test_each_command_builds_its_own_parser(name, module, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser(name).parse_args([name, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lowbit {name} ")
    assert f"lowbit.commands.{module}" in sys.modules


def test_chosen_command_is_the_first_word_not_an_option():
    assert cli.chosen_command(["formats", "nf4"]) == "formats"
    assert cli.chosen_command(["-h", "bits", "1"]) == "bits"
    assert cli.chosen_command(["--version"]) is None
    assert cli.chosen_command([]) is None


def _boom(args):
    raise RuntimeError("a shape bug\nover two lines")


def test_a_bug_is_an_internal_error_with_its_traceback_written(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(formats_cmd, "run", _boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    assert cli.main(["formats"]) == 3
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert err.startswith("lowbit formats: internal error (a bug in lowbit, not your input): RuntimeError: "
                          "a shape bug over two lines; traceback in ")
    (written,) = tmp_path.glob("lowbit-formats-*.traceback.txt")
    assert str(written) in err
    text = written.read_text()
    assert "Traceback (most recent call last)" in text and "RuntimeError: a shape bug" in text


def test_lowbit_debug_shows_the_traceback(monkeypatch, tmp_path):
    monkeypatch.setattr(formats_cmd, "run", _boom)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    monkeypatch.setenv("LOWBIT_DEBUG", "1")
    with pytest.raises(RuntimeError, match="a shape bug"):
        cli.main(["formats"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [InputError("no such format 'nf9'"), FileNotFoundError(2, "No such file", "x.json")])
def test_user_errors_are_one_line_with_exit_2(monkeypatch, tmp_path, capsys, error):
    def fail(args):
        raise error

    monkeypatch.setattr(formats_cmd, "run", fail)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert cli.main(["formats"]) == 2
    err = capsys.readouterr().err
    assert err == f"lowbit formats: error: {error}\n"
    assert "internal error" not in err
    assert list(Path(tmp_path).iterdir()) == []  # no traceback file for a user error


@pytest.mark.parametrize("command", ["quantize", "compare"])
def test_a_bug_inside_a_quantization_step_is_exit_3_and_writes_nothing(command, tiny_lm_dir, monkeypatch, tmp_path,
                                                                      capsys):
    """Not a failed row of compare, not a 'bad input' line: a non-lowbit exception raised while a layer is rounded
    ends the command with exit 3 and the traceback's file, and no output is left behind."""
    from lowbit.layers import surgery

    def shape_bug(*args, **kwargs):
        raise IndexError("index 64 is out of bounds for dimension 0 with size 64")

    monkeypatch.setattr(surgery, "quantize_weight", shape_bug)
    traces = tmp_path / "traces"
    traces.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(traces))
    monkeypatch.delenv("LOWBIT_DEBUG", raising=False)
    out = tmp_path / "out"
    argv = {"quantize": ["quantize", "--model", str(tiny_lm_dir), "--format", "nf4", "-o", str(out)],
            "compare": ["compare", "--model", str(tiny_lm_dir), "--formats", "nf4", "--windows", "1", "--window",
                        "64", "--json", str(out)]}[command]
    assert cli.main(argv) == 3
    err = capsys.readouterr().err
    assert f"lowbit {command}: internal error (a bug in lowbit, not your input): IndexError: index 64" in err
    (written,) = traces.glob(f"lowbit-{command}-*.traceback.txt")
    assert "shape_bug" in written.read_text()
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["traces"]
