"""Sensitivity's cells as units of work: each measured by ``cell`` as a worker does (the model loaded again from
its files) gives the table of the walk that measures them together, to the bit; a worker whose files are not the
driver's refuses to measure. Ray itself: tests/cluster/test_sensitivity_ray.py."""

import pickle

import pytest
import torch

from lowbit.cluster.pool import Pool
from lowbit.errors import ModelLoadError
from lowbit.models.lazy import load_lazily
from lowbit.planning.sensitivity import measure_sensitivity
from lowbit.planning.sensitivity_cells import CellJob, _worker


class Here(Pool):
    """A distributed pool in this process: each cell goes through ``sensitivity_cells.cell`` with its arguments
    as a task gets them (``sent``)."""

    distributed = True

    def __init__(self):
        self.units = []

    def map(self, fn, units, shared=()):
        shared = sent(shared)
        for unit in units:
            self.units.append(unit[:2])  # block index, layer
            yield fn(*shared, *sent(unit))


def sent(x):
    """``x`` pickled and read back outside inference mode, as a Ray worker reads a task's arguments: its tensors
    are not inference tensors."""
    with torch.inference_mode(False):
        return pickle.loads(pickle.dumps(x))


@pytest.fixture(scope="module")
def tiny(tiny_lm_dir):
    batches = [torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    return str(tiny_lm_dir), batches


def test_cells_measured_one_by_one_as_a_worker_does_give_the_walks_table(tiny):
    spec, batches = tiny
    lazy, _, info, weights = load_lazily(spec)
    kwargs = {"measure": "all", "exclude": (), "progress": False, "weights": weights}
    together = measure_sensitivity(lazy, ["q4_0", "int8"], batches, **kwargs)
    pool = Here()
    alone = measure_sensitivity(lazy, ["q4_0", "int8"], batches, pool=pool, spec=spec,
                                file_hash=info.file_hash, **kwargs)
    assert alone.to_dict() | {"seconds": 0} == together.to_dict() | {"seconds": 0}
    assert len(pool.units) == 2 * (2 * 7 + 1) and pool.units[-1] == (None, "lm_head")  # the tied head: outside
    blocks = [2 if i is None else i for i, _ in pool.units]
    assert blocks == sorted(blocks) and blocks[:2] == [0, 0]  # block by block, the layers outside last
    assert all(p.is_meta for p in lazy.parameters())  # the driver's model left as it was


def test_a_worker_whose_files_differ_from_the_drivers_refuses(tiny):
    spec, batches = tiny
    with pytest.raises(ModelLoadError, match="every node must read the same files"):
        _worker(CellJob.of(spec, "0" * 64, batches))


def test_a_job_holds_the_batches_by_value():
    batches = [torch.tensor([[5, 7, 11]]), torch.tensor([[2, 3, 4]])]
    job = CellJob.of(None, "ab", batches)
    assert hash(job) == hash(CellJob.of(None, "ab", [b.clone() for b in batches]))  # a worker's cache key
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(job.batches(), batches, strict=True))
