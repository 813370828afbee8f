"""Real Ray clusters for the tests, on this machine, started by the tests and always stopped.

``private()``: ``ray.init`` with two worker CPUs (what ``--ray local`` starts). ``Cluster``: ``ray start --head``
and more nodes, each its own ``ray start --block`` process in its own session, on 127.0.0.1 with Ray's token
authentication; stopping it kills each session's processes. Ray's servers listen on every interface (it has no
option to bind one); the token keeps anyone else out.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, suppress
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
# RAY_AUTH_MODE: every process of a cluster, its drivers too, must agree (docs.ray.io "Token authentication")
ENV = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
START_SECONDS = 300  # a loaded 2-core machine: ray start alone took over 60 s


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def private(cpus: int = 2):
    """A private Ray instance in this process, stopped after."""
    import ray

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=300 << 20, log_to_driver=False, configure_logging=False)
    try:
        yield ray
    finally:
        ray.shutdown()


class Cluster:
    """``ray start --head`` on a free loopback port, then ``add_node()`` for more nodes; ``stop()`` (or leaving the
    ``with``) kills every process each started."""

    def __init__(self, cpus: int = 1):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[subprocess.Popen] = []
        self._start(["--head", f"--port={self.port}", "--include-dashboard=false"], cpus)

    def _start(self, args: list[str], cpus: int) -> subprocess.Popen:
        before = self._alive_nodes()
        log = tempfile.TemporaryFile("w+")  # noqa: SIM115 - the node writes it for as long as it runs
        node = subprocess.Popen([RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={cpus}",
                                 "--object-store-memory=200000000", "--disable-usage-stats", *args],
                                env=ENV, start_new_session=True, stdout=log, stderr=subprocess.STDOUT)
        self.nodes.append(node)
        deadline = time.monotonic() + START_SECONDS
        while self._alive_nodes() <= before:
            if node.poll() is not None or time.monotonic() > deadline:
                self.stop()
                log.seek(0)
                raise RuntimeError(f"ray start {' '.join(args)} did not come up: {log.read()[-3000:]}")
            time.sleep(1)
        return node

    def add_node(self, cpus: int = 1) -> subprocess.Popen:
        return self._start([f"--address={self.address}"], cpus)

    def _alive_nodes(self) -> int:
        if not self.nodes:
            return 0
        probe = (f"import ray; ray.init(address={self.address!r}, log_to_driver=False, configure_logging=False); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        try:
            out = subprocess.run([sys.executable, "-c", probe], env=ENV, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return 0
        lines = out.stdout.split()
        return int(lines[-1]) if out.returncode == 0 and lines else 0

    def kill(self, node: subprocess.Popen) -> None:
        """Every process ``node`` started (its session: Ray moves some into process groups of their own), killed at
        once: the node disappears."""
        for pid in session(node.pid):
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        node.wait()

    def stop(self) -> None:
        for node in reversed(self.nodes):
            self.kill(node)

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def session(sid: int) -> list[int]:
    """The processes of session ``sid``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rpartition(")")[2].split()[3]) == sid:  # stat's 6th field: the session
                found.append(int(stat.parent.name))
    return found


def worker_pids() -> list[int]:
    """The Ray worker processes running a lowbit unit now (``RayPool``'s tasks run ``_call``)."""
    out = subprocess.run(["pgrep", "-f", "ray::_call"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def ray_processes() -> set[int]:
    """Every raylet and GCS server on this machine."""
    out = subprocess.run(["pgrep", "-f", "raylet|gcs_server"], capture_output=True, text=True)
    return {int(p) for p in out.stdout.split()}
