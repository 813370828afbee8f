"""Atomic file and directory writes: the old content or the whole new one, never a mix; what a killed run left
beside an output is removed by the next write, and only that (issue 25, finding 5)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from lowbit.cli import main
from lowbit.files.atomic import atomic_dir, atomic_file, chmod_as_new, save_tensors, sweep_stale_temps, write_json


def test_write_json_is_strict_json(tmp_path):
    out = write_json(tmp_path / "r.json", {"kl": float("nan"), "ppl": [1.5, float("inf")], "n": 3})
    assert json.loads(out.read_text(), parse_constant=pytest.fail) == {"kl": None, "ppl": [1.5, None], "n": 3}


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert target.read_text() == "old" and os.listdir(tmp_path) == ["f.txt"]


def test_overwrite_replaces_a_directory_whole(tmp_path):
    target = tmp_path / "d"
    target.mkdir()
    (target / "stale").write_text("x")
    with pytest.raises(RuntimeError), atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
        raise RuntimeError
    assert os.listdir(target) == ["stale"]  # a failed overwrite leaves the old directory
    with atomic_dir(target, overwrite=True) as tmp:
        (tmp / "new").write_text("y")
    assert os.listdir(target) == ["new"] and os.listdir(tmp_path) == ["d"]
    with pytest.raises(FileExistsError, match="--overwrite"), atomic_dir(target):
        pass


def test_a_directory_that_appears_during_the_write_is_never_replaced(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(FileExistsError, match="appeared while"), atomic_dir(target) as tmp:
        (tmp / "new").write_text("y")
        target.mkdir()  # another run, or the user, created it meanwhile
        (target / "precious").write_text("mine")
    assert os.listdir(target) == ["precious"] and os.listdir(tmp_path) == ["out"]


def test_overwrite_asks_again_at_the_swap(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(FileExistsError, match="changed while"), \
            atomic_dir(target, overwrite=True, replaceable=lambda old: not any(old.iterdir())) as tmp:
        (tmp / "new").write_text("y")
        (target / "precious").write_text("written meanwhile")
    assert os.listdir(target) == ["precious"] and os.listdir(tmp_path) == ["out"]


def test_current_directory_and_symlinks_are_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "real")
    for target, match in ((".", "current directory"), (tmp_path / "link", "symbolic link")):
        with pytest.raises(FileExistsError, match=match), atomic_dir(target, overwrite=True):
            pytest.fail("must not start")
    assert sorted(os.listdir(tmp_path)) == ["link", "real"] and os.listdir(tmp_path / "real") == []


def test_a_file_is_replaced_only_as_allowed_at_the_rename(tmp_path):
    """export --to gguf's rule: no existing file without overwrite, and with it only one ``replaceable`` accepts,
    asked after the new file is written (a file may appear or change meanwhile); the temp never stays."""
    target = tmp_path / "m.gguf"
    with pytest.raises(FileExistsError, match="appeared while"), atomic_file(target, overwrite=False) as tmp:
        tmp.write_text("new")
        target.write_text("theirs")
    with pytest.raises(FileExistsError, match="changed while"), \
            atomic_file(target, replaceable=lambda p: p.read_text() == "ours") as tmp:
        tmp.write_text("new")
    assert os.listdir(tmp_path) == ["m.gguf"] and target.read_text() == "theirs"
    target.write_text("ours")
    with atomic_file(target, replaceable=lambda p: p.read_text() == "ours") as tmp:
        tmp.write_text("new")
    assert os.listdir(tmp_path) == ["m.gguf"] and target.read_text() == "new"


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_saved_tensors_have_the_permissions_of_any_new_file(tmp_path, umask):
    """safetensors writes 0600; save_tensors gives the file what the umask gives a new one, and marks it
    as torch's ("format": "pt", what transformers' from_pretrained asks of a model.safetensors)."""
    import torch
    from safetensors import safe_open

    before = os.umask(umask)
    try:
        save_tensors({"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}, tmp_path / "m.safetensors")
    finally:
        os.umask(before)
    assert oct(os.stat(tmp_path / "m.safetensors").st_mode & 0o777) == oct(0o666 & ~umask)
    with safe_open(tmp_path / "m.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"} and f.get_tensor("w").tolist() == [[0, 1, 2], [3, 4, 5]]



@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_new_files_and_directories_get_what_the_umask_gives(tmp_path, umask):
    """What open() and mkdir() would have made, for chmod_as_new and for atomic_file's and atomic_dir's outputs
    (mkstemp and mkdtemp make 0600 and 0700)."""
    made, folder = tmp_path / "made", tmp_path / "folder"
    made.touch(mode=0o600)
    folder.mkdir(mode=0o700)
    before = os.umask(umask)
    try:
        chmod_as_new(made), chmod_as_new(folder)
        with atomic_file(tmp_path / "f.txt") as tmp:
            tmp.write_text("new")
        with atomic_dir(tmp_path / "d"):
            pass
    finally:
        os.umask(before)
    for path, mode in ((made, 0o666), (tmp_path / "f.txt", 0o666), (folder, 0o777), (tmp_path / "d", 0o777)):
        assert oct(os.stat(path).st_mode & 0o777) == oct(mode & ~umask), path

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
