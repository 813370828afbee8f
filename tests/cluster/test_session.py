"""--ray and LOWBIT_RAY: no Ray without them; a cluster that cannot be reached is a one-line error in seconds;
--ray local starts a private instance for the run and leaves no Ray process behind."""

import socket
import subprocess
import sys
import tempfile
import time

import pytest

from lowbit.cluster.session import CONNECT_SECONDS, ENV, JOIN_SECONDS, pool, ray_target
from lowbit.errors import InputError

from .ray_cluster import free_port, ray_processes


def test_without_the_option_nothing_imports_ray(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    code = ("import sys; from lowbit.cluster.session import pool\n"
            "with pool(None) as p: assert not p.distributed\n"
            "import lowbit.commands.quantize_cmd, lowbit.commands.compare_cmd\n"
            "assert 'ray' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_environment_names_the_cluster_when_the_option_does_not(monkeypatch):
    monkeypatch.setenv(ENV, "auto")
    assert ray_target(None) == "auto" and ray_target("local") == "local"
    monkeypatch.setenv(ENV, "")
    assert ray_target(None) is None


@pytest.mark.parametrize("target", ["nonsense", "127.0.0.1:notaport"])
def test_a_malformed_address_is_refused(target):
    with pytest.raises(InputError, match="expected local, auto or HOST:PORT"), pool(target):
        pass


def test_an_address_nobody_answers_is_one_line_in_seconds():
    start = time.monotonic()
    with pytest.raises(InputError, match=r"--ray 127\.0\.0\.1:\d+: no Ray cluster answers there"), \
            pool(f"127.0.0.1:{free_port()}"):
        pass
    assert time.monotonic() - start < CONNECT_SECONDS


def test_an_address_that_accepts_and_never_answers_is_not_a_hang():
    """A port that accepts connections but is not Ray (another program's), where ray.init retries for ever: given
    up after JOIN_SECONDS, the process free to exit."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        code = (f"from lowbit.cluster.session import pool\n"
                f"with pool('127.0.0.1:{listener.getsockname()[1]}'): pass")
        start = time.monotonic()
        child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               timeout=JOIN_SECONDS + 60)
    assert "InputError: --ray 127.0.0.1" in child.stderr and "no Ray cluster answered" in child.stderr
    assert time.monotonic() - start < JOIN_SECONDS + 30


def test_auto_without_a_cluster_is_one_line(monkeypatch, tmp_path):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # no `ray start` recorded there
    with pytest.raises(InputError, match="no Ray cluster runs here"), pool("auto"):
        pass
    # one recorded by a `ray start` since killed (its file stays)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{free_port()}\n")
    with pytest.raises(InputError, match="no Ray cluster answers there"), pool("auto"):
        pass


def test_local_starts_a_private_instance_and_stops_it():
    before = ray_processes()
    with pool("local") as workers:
        assert workers.distributed and ray_processes() - before
    time.sleep(2)
    assert not ray_processes() - before
