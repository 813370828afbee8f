"""commands.common: the --verify option every command that takes --model has, and load passing it on."""

from __future__ import annotations

import argparse
import io
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from lowbit.commands.common import add_model_arg, load
from lowbit.models import hashing


def test_model_commands_take_verify():
    p = argparse.ArgumentParser()
    add_model_arg(p)
    assert p.parse_args([]).verify is False
    assert p.parse_args(["--model", "m", "--verify"]).verify is True


@pytest.fixture
def reads(monkeypatch):
    """The files hashing has read; files written by the test count as settled (the rule wants seconds)."""
    monkeypatch.setattr(hashing, "_SETTLED_NS", 0)
    seen = []
    real = hashing._read
    monkeypatch.setattr(hashing, "_read", lambda f: (seen.append(Path(f.name).name), real(f))[1])
    return seen


def test_load_reads_the_files_again_only_with_verify(tmp_path, tiny_lm_dir, reads):
    directory = tmp_path / "m"
    shutil.copytree(tiny_lm_dir, directory)
    con = Console(file=io.StringIO())
    info = load(str(directory), con)[2]
    assert sorted(reads) == ["config.json", "model.safetensors"]
    assert load(str(directory), con)[2] == info and len(reads) == 2
    assert load(str(directory), con, verify=True)[2] == info and sorted(reads[2:]) == sorted(reads[:2])


def test_a_loader_of_its_own_is_called_with_the_spec_alone():
    con = Console(file=io.StringIO())
    assert load("x", con, loader=lambda spec: ("loaded", spec)) == ("loaded", "x")
