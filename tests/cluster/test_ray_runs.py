"""The commands on Ray write what they write without it, to the byte (issue 28): `quantize` (rounding alone and
a calibrated plan), `compare` of four formats; a driver stopped by SIGTERM leaves no half-written output and
--resume continues; a worker process killed mid-task, or a whole node lost, costs only its tasks.

The fast tests use the tiny Llamas of tests/io/test_resume.py and ``--ray local`` (or ``LOWBIT_RAY``); the slow
ones the embedded SmolLM2 and a two-node cluster started here (``ray start``), always stopped:

    .venv/bin/pytest -m slow tests/cluster
"""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lowbit.cli import main
from lowbit.files.partial import partial_path
from tests.io.test_resume import calibrated, checkpoint, deeper, quantize, read_back  # noqa: F401 - fixtures

from .ray_cluster import ENV, Cluster, ray_processes, session, worker_pids

ROOT = Path(__file__).parents[2]
FOUR = "nf4,q4_0,int8,nf4@mse"


def without_times(report: dict) -> dict:
    """A compare report's numbers: every row's but its times, and no date."""
    rows = [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in report["results"]]
    return {**{k: v for k, v in report.items() if k not in ("date", "results")}, "results": rows}


def test_rounding_on_ray_writes_the_same_bytes(checkpoint, tmp_path, monkeypatch):  # noqa: F811
    assert main(quantize(checkpoint, tmp_path / "here", "--format", "nf4@mse")) == 0
    monkeypatch.setenv("LOWBIT_RAY", "local")  # as --ray local
    assert main(quantize(checkpoint, tmp_path / "ray", "--format", "nf4@mse")) == 0
    assert read_back(tmp_path / "ray") == read_back(tmp_path / "here")


def test_a_calibrated_plan_on_ray_writes_the_same_bytes(deeper, tmp_path):  # noqa: F811
    label = "nf4/32+dq+had+gptq@amse"
    assert main(calibrated(deeper, tmp_path / "here", label)) == 0
    assert main(calibrated(deeper, tmp_path / "ray", label, "--ray", "local")) == 0
    assert read_back(tmp_path / "ray") == read_back(tmp_path / "here")


def test_compare_on_ray_gives_the_same_numbers(deeper, tmp_path):  # noqa: F811
    model, text = deeper
    argv = ["compare", "--model", str(model), "--formats", FOUR, "--text", str(text), "--window", "16",
            "--windows", "2"]
    assert main([*argv, "--json", str(tmp_path / "here.json")]) == 0
    assert main([*argv, "--json", str(tmp_path / "ray.json"), "--ray", "local"]) == 0
    here, ray = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("here", "ray"))
    assert [r["format"] for r in ray["results"]] == ["keep bf16", *FOUR.split(",")]
    assert without_times(ray) == without_times(here)


def run_until(argv: list[str], ready, *, env=None, timeout: float = 600) -> subprocess.Popen:
    """`lowbit ARGV` started, and returned once ``ready()`` is true (polled)."""
    child = subprocess.Popen([sys.executable, "-m", "lowbit.cli", *argv], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    while not ready():
        assert child.poll() is None, child.communicate()
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.05)
    return child


SMOLLM2_SHARD = "20MB"  # about 40 shards of the embedded model's output: many places to stop


@pytest.fixture(scope="module")
def smollm2_nf4(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("serial") / "q"
    assert main(["quantize", "--format", "nf4@mse", "-o", str(out), "--shard-size", SMOLLM2_SHARD]) == 0
    return read_back(out)


@pytest.mark.slow
def test_a_driver_stopped_by_sigterm_leaves_no_half_written_output_and_resumes(smollm2_nf4, tmp_path):
    out = tmp_path / "q"
    argv = ["quantize", "--format", "nf4@mse", "-o", str(out), "--shard-size", SMOLLM2_SHARD, "--ray", "local"]
    before = ray_processes()
    child = run_until(argv, lambda: len(list(partial_path(out).glob("shard-*"))) >= 2)
    started = ray_processes() - before
    assert started  # the run's private instance
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=120)
    assert child.returncode != 0 and "--resume continues" in err
    assert not out.exists() and len(list(partial_path(out).glob("shard-*"))) >= 2
    deadline = time.monotonic() + 30
    while started & ray_processes() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not started & ray_processes()  # the private instance went with it
    assert main([*argv, "--resume"]) == 0
    assert read_back(out) == smollm2_nf4


@pytest.fixture(scope="module")
def two_nodes():
    with Cluster(cpus=1) as cluster:
        second = cluster.add_node(cpus=1)
        yield cluster, second


@pytest.mark.slow
def test_a_worker_killed_mid_task_costs_only_its_task(two_nodes, smollm2_nf4, tmp_path):
    cluster, _ = two_nodes
    out = tmp_path / "q"
    child = run_until(["quantize", "--format", "nf4@mse", "-o", str(out), "--shard-size", SMOLLM2_SHARD,
                       "--ray", cluster.address], lambda: worker_pids(), env=ENV)
    victim = worker_pids()[0]
    subprocess.run(["kill", "-9", str(victim)], check=True)
    _, err = child.communicate(timeout=900)
    assert child.returncode == 0, err
    assert read_back(out) == smollm2_nf4


@pytest.mark.slow
def test_a_node_that_disappears_costs_only_its_tasks(two_nodes, smollm2_nf4, tmp_path):
    cluster, second = two_nodes
    out = tmp_path / "q"

    def on_second() -> bool:
        return bool(set(worker_pids()) & set(session(second.pid)))

    child = run_until(["quantize", "--format", "nf4@mse", "-o", str(out), "--shard-size", SMOLLM2_SHARD,
                       "--ray", cluster.address], on_second, env=ENV)
    cluster.kill(second)
    _, err = child.communicate(timeout=900)
    assert child.returncode == 0, err
    assert read_back(out) == smollm2_nf4
