"""``lowbit sensitivity --ray``: each measured (layer, candidate) a Ray task, on workers that read the model from
its files again, gives the table this process measures alone, every number but the seconds."""

import pytest
import torch

from lowbit.calibration.importance import calibration_batches
from lowbit.cluster.pool import SERIAL, RayPool
from lowbit.models.lazy import load_lazily
from lowbit.planning.sensitivity import measure_sensitivity

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def workers():
    """A private Ray instance on this machine (loopback, no dashboard) for this module's tests; ``address="local"``:
    a new one even where a ``ray start`` cluster runs here (ray.init would join that)."""
    try:
        ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 object_store_memory=300 << 20, log_to_driver=False)
        yield RayPool(ray, torch.get_num_threads())
    finally:
        ray.shutdown()


def test_cells_as_ray_tasks_give_the_table_measured_here(smollm2, workers):
    """The layers of the last two blocks (few later blocks to run: a short test) and the tied head (outside the
    blocks: every block rerun), one 64-token window."""
    _, tokenizer, info, _ = smollm2
    lazy, _, found, weights = load_lazily(None)
    assert weights is not None, "the embedded SmolLM2's converted safetensors are cached after its first load"
    batches, _ = calibration_batches(tokenizer, info.kind, None, window=64, scored=16, count=1)
    kwargs = {"include": ("model.layers.28.*", "model.layers.29.mlp.down_proj", "lm_head"), "exclude": (),
              "weights": weights, "progress": False}
    here = measure_sensitivity(lazy, ["q4_0", "int8"], batches, pool=SERIAL, **kwargs).to_dict()
    there = measure_sensitivity(lazy, ["q4_0", "int8"], batches, pool=workers, spec=None,
                                file_hash=found.file_hash, **kwargs).to_dict()
    assert len(here["layers"]) == 7 + 1 + 1 and here["layers"][-1]["name"] == "lm_head"
    assert sum(c["measured"] for layer in here["layers"] for c in layer["costs"].values()) == 9
    del here["seconds"], there["seconds"]
    assert there == here


def test_a_model_held_in_memory_cannot_be_sent(smollm2, workers):
    model, tokenizer, info, _ = smollm2
    batches, _ = calibration_batches(tokenizer, info.kind, None, window=64, scored=16, count=1)
    with pytest.raises(ValueError, match="--ray needs the model as a safetensors directory"):
        measure_sensitivity(model, ["q4_0", "int8"], batches, pool=workers, file_hash=info.file_hash,
                            include=("model.layers.0.mlp.down_proj",), progress=False)
