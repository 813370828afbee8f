"""lowbit.cluster.pool: units run in order here, or as Ray tasks on a real local instance with the same results,
a task's own error raised as itself, and a worker killed mid-task replaced and its task run again."""

import os
from pathlib import Path

import pytest
import torch

from lowbit.cluster.pool import SERIAL, RayPool
from lowbit.errors import InputError

from .ray_cluster import private


def scaled(k, x):
    return k * x


def threads():
    return torch.get_num_threads()


def failing(x):
    if x == 2:
        raise InputError(f"unit {x} cannot be done")
    return x


def dies_once(marker, x):
    """Kills its own worker process the first time it runs for ``x == 1`` (a marker file says it did)."""
    path = Path(marker)
    if x == 1 and not path.exists():
        path.write_text(str(os.getpid()))
        os.kill(os.getpid(), 9)
    return x * x


def test_serial_pool_draws_each_unit_when_its_result_is_wanted():
    drawn = []

    def units():
        for i in range(3):
            drawn.append(i)
            yield (i,)

    results = SERIAL.map(scaled, units(), shared=(10,))
    assert drawn == []
    assert next(results) == 0 and drawn == [0]
    assert list(results) == [10, 20] and drawn == [0, 1, 2]


@pytest.fixture(scope="module")
def ray_pool():
    with private(cpus=2) as ray:
        yield RayPool(ray, threads=torch.get_num_threads())


def test_ray_pool_gives_the_results_in_order_with_the_drivers_threads(ray_pool):
    assert list(ray_pool.map(scaled, ((i,) for i in range(20)), shared=(3,))) == [3 * i for i in range(20)]
    assert set(ray_pool.map(threads, [()] * 4)) == {torch.get_num_threads()}


def test_a_tasks_own_error_is_raised_as_itself(ray_pool):
    with pytest.raises(InputError, match="unit 2 cannot be done"):
        list(ray_pool.map(failing, ((i,) for i in range(4))))


def test_a_worker_killed_mid_task_is_replaced_and_the_task_run_again(ray_pool, tmp_path):
    marker = tmp_path / "died"
    assert list(ray_pool.map(dies_once, ((i,) for i in range(4)), shared=(str(marker),))) == [0, 1, 4, 9]
    assert marker.exists()  # it did die once
