"""An ordered map over units of work: run here one after another, or as Ray tasks.

A command hands ``Pool.map`` a module-level function and the arguments of each unit (a layer to round, one
layer's GPTQ within a block, a format of a sweep, a sensitivity cell) and consumes the results in the units'
order, so what it writes is the same whichever pool ran them. The serial pool calls the function as each unit is
drawn, so memory and every operation are exactly those of a plain loop. ``RayPool`` keeps a bounded number of
tasks in flight (memory holds their arguments and results, not every unit's) and leaves retries to Ray: a
worker process that dies is replaced and its task run again (``max_retries``), and a node that disappears costs
only its unfinished tasks, run again elsewhere. Units are pure functions of their arguments, so a task run again
gives the same bytes.

Each task runs with the driver's number of torch threads, and is scheduled on as many CPUs: a float reduction
(a dot product, a sum) adds its partial sums in an order that depends on the thread count, and a task must compute
the floats this process would (an SQNR differed in its 15th digit with 1 thread against 2).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

# a task whose worker process died is run again this many times (Ray's own default for tasks, written out:
# docs.ray.io "Fault tolerance: Tasks", max_retries)
RETRIES = 3
# tasks in flight per CPU of the cluster: every CPU busy while the driver consumes results in order
IN_FLIGHT_PER_CPU = 2


class Pool:
    """The serial pool: each unit run here, in order, as the results are drawn."""

    distributed = False
    in_flight = 1  # units running at once

    def map(self, fn: Callable, units: Iterable[tuple], shared: tuple = ()) -> Iterator:
        """``fn(*shared, *unit)`` for each unit, in order. A unit is drawn only when its result is wanted, and
        dropped before the next is drawn (a GPTQ Hessian, freed once used)."""
        for unit in units:
            result = fn(*shared, *unit)
            del unit
            yield result


SERIAL = Pool()


class RayPool(Pool):
    """Units as tasks on the Ray cluster ``ray`` (the module, connected: ``lowbit.cluster.session``), each run with
    ``threads`` torch threads (this process's)."""

    distributed = True

    def __init__(self, ray: Any, threads: int):
        self.ray, self.threads = ray, threads
        self._remote = None
        nodes = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
        # as many CPUs as threads, but no more than the largest node has (else no node could run a task)
        self.cpus = max(1, min(threads, int(max(nodes, default=1))))
        self.in_flight = max(1, int(sum(nodes)) // self.cpus * IN_FLIGHT_PER_CPU)

    def map(self, fn: Callable, units: Iterable[tuple], shared: tuple = ()) -> Iterator:
        """``fn(*shared, *unit)`` for each unit as a task, the results in the units' order. ``shared`` goes to the
        object store once, not with every task. A task's error is raised here as the error it raised; the tasks
        still in flight are cancelled when the caller stops drawing (an error, Ctrl-C)."""
        if self._remote is None:
            self._remote = self.ray.remote(_call).options(num_cpus=self.cpus, max_retries=RETRIES,
                                                          retry_exceptions=False)
        refs = [self.ray.put(s) for s in (self.threads, fn, *shared)]
        units, pending = iter(units), deque()
        try:
            for unit in units:
                pending.append(self._remote.remote(*refs, *unit))
                del unit
                if len(pending) >= self.in_flight:
                    yield self._get(pending.popleft())
            while pending:
                yield self._get(pending.popleft())
        finally:
            for ref in pending:
                self.ray.cancel(ref, force=True)

    def _get(self, ref):
        from ray.exceptions import RayTaskError

        try:
            return self.ray.get(ref)
        except RayTaskError as e:  # the task's own error (a layer the format cannot hold), raised as itself
            cause = e.cause
            raise cause.with_traceback(None) if isinstance(cause, BaseException) else e from None


def _call(threads: int, fn: Callable, *args):
    """``fn(*args)`` on a worker with ``threads`` torch threads."""
    import torch

    torch.set_num_threads(threads)
    return fn(*args)
