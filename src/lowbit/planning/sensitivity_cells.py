"""Sensitivity's cells, and each as a unit of work a worker measures (``lowbit.cluster.pool``).

A cell is one (layer, candidate) whose KL ``lowbit.planning.sensitivity`` measures: the layer's block run on the
inputs the walk reached with the candidate's dequantized weight in place, every later block on its outputs, then
what follows the blocks (``tail_logprobs``) and the mean KL against the unchanged model's log-probabilities
(``mean_kl``). A layer outside the blocks is run with every block, on inputs caught anew.

On a worker (``cell``) the model is loaded again from the driver's ``--model`` (``load_lazily``; its files must hash
to the driver's), once per worker process, with what lies outside the blocks kept in memory for the process's
life; each cell reads the blocks it runs from the checkpoint. A cell so measured alone is the cell the driver
measures among its block's others, to the bit: ``through_blocks`` advances each stream on its own, the driver
sends the block's inputs, the reference and the dequantized weight it computed, and the pool runs the task with
the driver's torch threads.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ..calibration.engine import Block, BlockPass, Stream, call
from ..errors import InputError
from ..eval.blockwise import Onloaded, Resident, block_names, through_blocks


def tail_logprobs(model: nn.Module, engine: BlockPass, blocks: int, stream: Stream,
                  each: Callable[[int, torch.Tensor], None]) -> None:
    """``each(b, log-probabilities)`` for every batch ``b``, from a forward whose ``blocks`` blocks all replay
    ``stream``'s last outputs: only what follows the blocks is computed."""
    with engine.replaying(blocks, stream) as state:
        for b, batch in enumerate(engine.batches):
            state["batch"] = b
            each(b, logprobs(call(model, batch)))


def mean_kl(model: nn.Module, engine: BlockPass, blocks: int, reference: Sequence[torch.Tensor],
            stream: Stream) -> float:
    """Mean KL over the batches' tokens, against ``reference`` (per batch, the unchanged model's
    log-probabilities), of the model whose blocks reached ``stream``'s last outputs."""
    total, count = 0.0, 0

    def add(b: int, lq: torch.Tensor) -> None:
        nonlocal total, count
        lp = reference[b]
        kl = (lp.exp() * (lp - lq)).sum(-1)
        total += float(kl.double().sum())
        count += kl.numel()

    tail_logprobs(model, engine, blocks, stream, add)
    return total / count


@contextmanager
def replaced(weight: nn.Parameter, replacement: torch.Tensor) -> Iterator[None]:
    """``weight`` holding ``replacement`` while open."""
    saved, weight.data = weight.data, replacement.to(weight.dtype)
    try:
        yield
    finally:
        weight.data = saved


def logprobs(out) -> torch.Tensor:
    logits = getattr(out, "logits", None)
    if logits is None:
        raise InputError("sensitivity compares next-token distributions: it needs a causal LM (a model whose "
                         "output has logits)")
    return logits.float().log_softmax(-1)


@dataclass(frozen=True)
class CellJob:
    """What a worker needs besides a cell's own arguments: the model (``load_lazily(spec)``, whose files must be
    the driver's: ``file_hash``) and the calibration batches, as token ids (hashable: a worker's state is cached
    by its job)."""

    spec: str | None
    file_hash: str
    ids: tuple[tuple[tuple[int, ...], ...], ...]  # per batch, (rows, tokens)
    dtype: torch.dtype

    @classmethod
    def of(cls, spec: str | None, file_hash: str, batches: Sequence[torch.Tensor]) -> CellJob:
        if any(not isinstance(b, torch.Tensor) for b in batches):
            raise InputError("sensitivity measures a causal LM: its calibration batches are input-id tensors")
        return cls(spec, file_hash, tuple(tuple(map(tuple, b.tolist())) for b in batches), batches[0].dtype)

    def batches(self) -> list[torch.Tensor]:
        return [torch.tensor(ids, dtype=self.dtype) for ids in self.ids]


def cell(job: CellJob, reference: Sequence[torch.Tensor], index: int | None, layer: str, weight: torch.Tensor,
         inputs: list | None) -> float:
    """One cell as a unit of work: the mean KL of the model with ``layer``'s weight replaced by ``weight``.
    ``index``: the layer's block, whose inputs (per batch, the walk's stream there) are ``inputs``; None: a layer
    outside the blocks."""
    worker = _worker(job)
    with torch.inference_mode():
        # an inference tensor, as the parameter it stands in (read in inference mode) is: torch refuses a matmul with
        # a parameter of one whose data is an ordinary tensor, as a tensor unpickled here is
        weight = weight.clone()
        return worker.outside(layer, weight, reference) if index is None else \
            worker.block(index, layer, weight, inputs, reference)


@functools.lru_cache(maxsize=1)
def _worker(job: CellJob) -> _Worker:
    """The model of ``job`` as a worker holds it: loaded once per worker process."""
    from ..models.lazy import load_on_worker

    model, _, _, weights = load_on_worker(job.spec, job.file_hash)
    # a GGUF not converted on this node yet is loaded whole (and converted for the next time): the same floats
    return _Worker(Resident(model) if weights is None else Onloaded(model, weights), job.batches())


class _Worker:
    """The model of a worker: built on the meta device, what lies outside its blocks read in for the worker's life
    (as the driver holds it for its walk) and each block read while a cell runs it; or held in memory whole."""

    def __init__(self, run: Resident, batches: list[torch.Tensor]):
        self.run, self.model = run, run.model
        self.model.eval()
        self.blocks = block_names(self.model)
        self._stack = ExitStack()  # never closed: the process ends with it
        with torch.inference_mode():
            self._stack.enter_context(run.outside(self.blocks))
            self.engine = BlockPass(self.model, batches)

    def block(self, index: int, layer: str, weight: torch.Tensor, inputs: list,
              reference: Sequence[torch.Tensor]) -> float:
        name = self.blocks[index]
        stream = Stream(inputs)
        with self.run.block(name):  # the modules are looked up inside: their parameters are read in there
            block = Block(index, self.model.get_submodule(name), self.engine.masks, {})
            with replaced(self.model.get_submodule(layer).weight, weight):
                stream.advance(block.run(stream))
        through_blocks(self.run, self.engine, self.blocks, [stream], start=index + 1)
        return mean_kl(self.model, self.engine, len(self.blocks), reference, stream)

    def outside(self, layer: str, weight: torch.Tensor, reference: Sequence[torch.Tensor]) -> float:
        with replaced(self.model.get_submodule(layer).weight, weight):
            fresh = BlockPass(self.model, self.engine.batches).stream()
            through_blocks(self.run, self.engine, self.blocks, [fresh])
            return mean_kl(self.model, self.engine, len(self.blocks), reference, fresh)
