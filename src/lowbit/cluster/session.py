"""``--ray local|auto|ADDRESS`` (or ``LOWBIT_RAY``): the pool a command's units of work run on.

Without either, the serial pool, and Ray is never imported. ``local`` starts a private Ray instance on this
machine, on loopback, for the run and stops it afterwards; ``auto`` and an address join an existing cluster as
``ray.init(address=...)`` does (``auto``: the one ``RAY_ADDRESS`` or the last ``ray start`` on this machine
names). An address that does not answer is a one-line error within ``CONNECT_SECONDS``, not a hang. Every node
must have lowbit, torch and the model's files at the same paths (a shared filesystem); the results are the same
bytes as a run here on nodes of the same CPU kind (tests/cluster/test_session.py checks it on this machine).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import InputError
from .pool import SERIAL, Pool, RayPool

ENV = "LOWBIT_RAY"
# how long an address may take to accept a connection before it counts as unreachable
CONNECT_SECONDS = 10
# how long joining a cluster that accepted the connection may take (a healthy one: 1-3 s here)
JOIN_SECONDS = 30
LOOPBACK = "127.0.0.1"
RAY_CURRENT_CLUSTER = "ray_current_cluster"


def add_ray_arg(p) -> None:
    p.add_argument("--ray", metavar="local|auto|ADDRESS",
                   help="run the work as Ray tasks: local starts a private Ray instance on this machine for the run; "
                        "auto or HOST:PORT joins a running cluster (the model's files at the same path on every "
                        f"node); default ${ENV}, else this process alone")


def ray_target(value: str | None) -> str | None:
    """The ``--ray`` value, else ``LOWBIT_RAY``'s; None (or empty): no Ray."""
    return value or os.environ.get(ENV) or None


@contextmanager
def pool(value: str | None) -> Iterator[Pool]:
    """The pool ``value`` (``ray_target``) names, connected for the ``with`` and disconnected after it (a
    ``local`` instance stopped with it, whatever ends the block)."""
    target = ray_target(value)
    if target is None:
        yield SERIAL
        return
    ray = _import_ray()
    _connect(ray, target)
    import torch

    try:
        yield RayPool(ray, torch.get_num_threads())
    finally:
        ray.shutdown()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise InputError("--ray needs Ray: pip install 'lowbit[ray]'") from None
    return ray


def _connect(ray, target: str) -> None:
    quiet = {"log_to_driver": False, "configure_logging": False}
    if target == "local":
        # a new instance even where `ray start` ran here (ray.init without an address would join that cluster),
        # on loopback, no dashboard
        ray.init(address="local", include_dashboard=False, _node_ip_address=LOOPBACK, **quiet)
        return
    _check_reachable(_address(target) if target == "auto" else target)
    failed: list[BaseException] = []

    def join() -> None:
        try:
            ray.init(address=target, **quiet)
        except BaseException as e:  # noqa: BLE001 - said on the driver's thread
            failed.append(e)

    # ray.init retries a port that accepts connections but is not Ray (another program's) for ever: it is given
    # JOIN_SECONDS in a thread of its own, abandoned after (it holds nothing of ours)
    joining = threading.Thread(target=join, daemon=True)
    joining.start()
    joining.join(JOIN_SECONDS)
    if joining.is_alive():
        raise InputError(f"--ray {target}: no Ray cluster answered there within {JOIN_SECONDS} s")
    if failed:
        e = failed[0]
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"--ray {target}: cannot join the Ray cluster ({first})") from None


def _address(target: str) -> str:
    """The address ``auto`` names, as Ray finds it: ``RAY_ADDRESS``, else the last ``ray start --head`` on this
    machine (the file ``ray._private.utils.read_ray_address`` reads, written by ``ray start``
    and removed by ``ray stop``); a one-line InputError where neither names one."""
    found = os.environ.get("RAY_ADDRESS")
    if not found:
        with contextlib.suppress(OSError):
            found = Path(tempfile.gettempdir(), "ray", RAY_CURRENT_CLUSTER).read_text().strip()
    if not found:
        raise InputError(f"--ray {target}: no Ray cluster runs here (no RAY_ADDRESS, no `ray start --head`): start "
                         "one, give its HOST:PORT, or use --ray local")
    return found


def _check_reachable(target: str) -> None:
    """A one-line InputError unless ``HOST:PORT`` (``ray://`` too) accepts a TCP connection within
    ``CONNECT_SECONDS``: ``ray.init`` itself retries an absent cluster for a minute or more."""
    where = target.removeprefix("ray://")
    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit():
        raise InputError(f"--ray {target}: expected local, auto or HOST:PORT (a Ray head's address)")
    try:
        with socket.create_connection((host, int(port)), timeout=CONNECT_SECONDS):
            pass
    except OSError as e:
        raise InputError(f"--ray {target}: no Ray cluster answers there ({e.strerror or e})") from None
