"""lowbit errors on a Ray pool (issue 28): each layer a task, the report the same as this process alone gives.

A private Ray instance on loopback, two CPUs, started once for the module and always stopped."""

import argparse
import json
from contextlib import contextmanager

import pytest
import torch
from torch import nn

from lowbit.calibration.importance import calibrate
from lowbit.cluster.pool import SERIAL, RayPool
from lowbit.commands import errors_cmd
from lowbit.planning import QuantPlan
from lowbit.workflows.errors import measure

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_pool():
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             object_store_memory=300 << 20, log_to_driver=False)
    try:
        yield RayPool(ray, torch.get_num_threads())
    finally:
        ray.shutdown()


def test_embedded_block_with_activation_weighted_search_is_the_same_on_ray(smollm2, ray_pool):
    """Block 0 of the embedded SmolLM2, nf4 and int4/64@amse (importance from 2 calibration windows)."""
    model, tokenizer, info, _ = smollm2
    plans = [QuantPlan.uniform(label, include=("model.layers.0.*",)) for label in ("nf4", "int4/64@amse")]
    names = [n for n, m in model.named_modules() if n.startswith("model.layers.0.") and isinstance(m, nn.Linear)]
    importance = calibrate(model, tokenizer, info.kind, None, window=64, scored=1, count=2, layers=names,
                           progress=False)
    here = measure(model, plans, importance=importance, progress=False, pool=SERIAL)
    there = measure(model, plans, importance=importance, progress=False, pool=ray_pool)
    assert len(here["layers"]) == 7 and "mean_weighted_sqnr_db" in here["formats"][1]
    assert there == here


def test_a_format_failed_by_an_earlier_layer_is_dropped_from_units_drawn_ahead(ray_pool):
    """q4_0 fails on layer b; the pool has already drawn c (2 in flight) with q4_0 still wanted."""

    class Three(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(64, 4), nn.Linear(64, 4), nn.Linear(64, 4)

    torch.manual_seed(0)
    model = Three()
    with torch.no_grad():
        model.b.weight[2, 37] = 6e5  # q4_0's fp16 scale would be -75000: past fp16 (tests/test_representable.py)
    plans = [QuantPlan.uniform("nf4"), QuantPlan.uniform("q4_0")]
    here = measure(model, plans, progress=False, pool=SERIAL)
    assert ray_pool.in_flight >= 2
    assert measure(model, plans, progress=False, pool=ray_pool) == here
    assert here["formats"][1]["error"].startswith("layer 'b' (weight 4x64): q4_0 cannot hold block")


def test_command_json_is_the_same_with_ray(tiny_lm_dir, ray_pool, tmp_path, monkeypatch):
    """``lowbit errors --ray``: the JSON of a run on the pool equals this process's, times aside."""

    @contextmanager
    def pool(value):
        assert value == "local"
        yield ray_pool  # the module's Ray instance, not a second one

    def errors(*argv):
        parser = argparse.ArgumentParser(prog="lowbit")
        errors_cmd.add_parser(parser.add_subparsers(dest="command", required=True))
        args = parser.parse_args(["errors", "--model", str(tiny_lm_dir), "--formats", "nf4,nf4@amse", "--layers",
                                  "mlp.*", "--window", "64", "--windows", "1", "--calibrate", "2", *map(str, argv)])
        assert args.run(args) == 0
        report = json.loads(argv[-1].read_text())
        del report["calibration"]["seconds"]
        return report

    here = errors("--json", tmp_path / "here.json")
    monkeypatch.setattr(errors_cmd, "pool", pool)
    assert errors("--ray", "local", "--json", tmp_path / "there.json") == here
