"""Issue 25, finding 5: what a killed run left beside an output is removed by the next write, and only that."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lowbit.cli import main
from lowbit.files.atomic import atomic_dir, atomic_file, sweep_stale_temps, write_json


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@pytest.fixture
def live_pid():
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield child.pid
    child.kill()
    child.wait()


def temp(parent, name, pid, suffix=".tmp", random="abcd_123"):
    """A temp as atomic_dir names it, holding one file."""
    path = parent / (f".{name}.{pid}_{random}{suffix}" if pid is not None else f".{name}.{random}{suffix}")
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"x" * 100)
    return path


def test_a_dead_runs_temp_goes_and_a_live_ones_stays(tmp_path, live_pid):
    dead = temp(tmp_path, "out", dead_pid())
    alive = temp(tmp_path, "out", live_pid, random="efgh_456")
    other = temp(tmp_path, "other", dead_pid())  # beside another output: not this write's business
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert not dead.exists() and alive.is_dir() and other.is_dir()
    assert (tmp_path / "out" / "f").read_text() == "new"


def test_a_file_temp_goes_before_the_next_write_of_that_file(tmp_path, live_pid):
    dead = tmp_path / f".r.json.{dead_pid()}_k2j4m9q1.tmp"
    dead.write_text("{half")
    alive = tmp_path / f".r.json.{live_pid}_p0o9i8u7.tmp"
    alive.write_text("{writing")
    write_json(tmp_path / "r.json", {"a": 1})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["r.json", alive.name])


def test_temps_named_before_the_pid_go_after_an_hour_untouched(tmp_path):
    old, fresh = temp(tmp_path, "out", None), temp(tmp_path, "out", None, random="zz_99_aa")
    hour_ago = time.time() - 3700  # cachedir.STALE_SECONDS is 3600
    for p in (old, old / "model.safetensors"):
        os.utime(p, (hour_ago, hour_ago))
    assert sweep_stale_temps(tmp_path / "out") == [old]
    assert fresh.is_dir()


def test_a_user_file_that_only_looks_alike_is_kept(tmp_path):
    names = [".out.tmp", ".out.notes.tmp", "out.123_abcdefgh.tmp", ".out.123_abcdefghi.tmp", ".out.12_ABCDEFGH.tmp"]
    for name in names:
        (tmp_path / name).write_text("mine")
    assert sweep_stale_temps(tmp_path / "out") == []
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def test_a_directory_moved_aside_by_a_killed_swap_is_put_back(tmp_path):
    """Killed between atomic_dir's two renames: the user's earlier output sits in '.out.PID_X.old' and 'out'
    is gone. The next run puts it back (and then, without --overwrite, refuses to replace it)."""
    old = temp(tmp_path, "out", dead_pid(), suffix=".old")
    with pytest.raises(FileExistsError, match="output exists"), atomic_dir(tmp_path / "out"):
        pass
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["model.safetensors"]
    assert not old.exists()
    # killed after the second rename: 'out' is the new output and the '.old' only waits to be deleted
    old = temp(tmp_path, "out", dead_pid(), suffix=".old")
    with atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "f").write_text("new")
    assert os.listdir(tmp_path) == ["out"] and os.listdir(tmp_path / "out") == ["f"]


def test_temps_carry_the_writers_pid(tmp_path):
    with atomic_file(tmp_path / "a.json") as tmp:
        assert tmp.name.startswith(f".a.json.{os.getpid()}_") and tmp.name.endswith(".tmp")
    with atomic_dir(tmp_path / "d") as tmp:
        assert tmp.name.startswith(f".d.{os.getpid()}_")
        assert sweep_stale_temps(tmp_path / "d") == []  # this process is alive: its own temp stays


def test_sigkill_during_quantize_then_the_same_output_again(tiny_lm_dir, tmp_path):
    """The finding: a run killed with SIGKILL while writing 'out' left '.out.XXXX.tmp' that no later run
    removed. Here a process is killed inside atomic_dir, then `lowbit quantize -o out` runs."""
    script = textwrap.dedent(f"""
        import sys, time
        from lowbit.files.atomic import atomic_dir
        with atomic_dir({str(tmp_path / 'out')!r}) as tmp:
            (tmp / "model.safetensors").write_bytes(b"x" * 4096)
            print("writing", flush=True)
            time.sleep(60)
    """)
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline() == "writing\n", child.stderr.read()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(f".out.{child.pid}_")
    child.send_signal(signal.SIGKILL)
    child.wait()
    child.stdout.close()
    child.stderr.close()
    assert main(["quantize", "--model", str(tiny_lm_dir), "--format", "int8", "-o", str(tmp_path / "out")]) == 0
    assert os.listdir(tmp_path) == ["out"]
