"""A calibration pass continued from the end of a block (``engine.serve(at_boundary=, resumed=)``): what it
carries from one block to the next, and how it is put back.

That is the consumers' own (``Consumer.carried``: each stream's hidden states for every batch, what a consumer
gathers over the blocks) and what stays of the walked blocks in memory (their norms, biases and kept weights, as
the consumers left them: ``+awq`` folds into the norms). Given that, the walk starts at the next block, its
streams made from the first block's inputs caught again (what precedes the blocks is read, no block is) with each
batch's hidden states in place of the first argument, and computes what it would have computed
(tests/calibration/test_carry.py, tests/io/test_resume.py).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import InputError
from ..files.partial import ProducerState

if TYPE_CHECKING:
    from .engine import BlockPass, Consumer, Stream


def carried_stream(stream: Stream | None) -> tuple[dict[str, torch.Tensor], dict | None]:
    """What ``resumed_stream`` makes ``stream`` again from: each batch's first argument (its hidden states; the
    other arguments are the caught ones, caught again) by batch index (``"0"``, ``"1"``, ...), and whether the
    raw outputs it stands in with were tuples; ``({}, None)`` for a stream not begun."""
    if stream is None:
        return {}, None
    outputs = None if stream.previous is None else "tuple" if isinstance(stream.previous[0], tuple) else "tensor"
    return {str(b): a[0] for b, (a, _) in enumerate(stream.inputs)}, {"batches": len(stream.inputs),
                                                                       "outputs": outputs}


def resumed_stream(engine: BlockPass, tensors: Mapping[str, torch.Tensor], info: dict | None,
                   count: int | None = None) -> Stream | None:
    """The stream ``carried_stream`` gave ``(tensors, info)`` of: ``engine.stream(count)`` with each batch's
    hidden states in place of its first argument (the other arguments are the same at every block)."""
    if info is None:
        return None
    stream = engine.stream(count)
    if len(stream.inputs) != info["batches"]:
        raise InputError(f"a stream of {info['batches']} batches cannot be continued on {len(stream.inputs)}")
    hidden = [tensors[str(b)] for b in range(info["batches"])]
    stream.inputs = [((h, *a[1:]), k) for h, (a, k) in zip(hidden, stream.inputs, strict=True)]
    if info["outputs"] is not None:  # the last block's raw outputs, which a replay stands in with
        stream.previous = [(h,) if info["outputs"] == "tuple" else h for h in hidden]
    return stream


def carried(engine: BlockPass, consumers: Sequence[Consumer], done: int) -> ProducerState:
    """What the pass needs to go on after block ``done - 1`` (``restore``): the parameters of blocks ``0 ..
    done-1`` still in memory (what ``BlockPass.release`` leaves: norms, biases, kept weights, as the consumers
    changed them), by name, and each consumer's ``carried`` under ``"I:"`` (its index in ``consumers``; no
    parameter name holds a colon); JSON ``{"blocks": done, "consumers": [each one's]}``."""
    tensors = {f"{engine.name_of(block)}.{n}": p.detach() for block in list(engine.blocks or ())[:done]
               for n, p in block.named_parameters() if not p.is_meta}
    infos = []
    for i, consumer in enumerate(consumers):
        held, info = consumer.carried()
        tensors.update({f"{i}:{k}": t for k, t in held.items()})
        infos.append(info)
    return ProducerState(tensors, {"blocks": done, "consumers": infos})


def restore(engine: BlockPass, consumers: Sequence[Consumer], state: ProducerState) -> int:
    """The model and ``consumers`` as ``carried`` left them; returns the block the walk goes on from. The
    parameters of the walked blocks are put in place of the meta ones, so they are never read."""
    put_parameters(engine.model, {k: t for k, t in state.tensors.items() if ":" not in k})
    infos = state.info["consumers"]
    if len(infos) != len(consumers):
        raise InputError(f"a pass of {len(infos)} consumers cannot be continued with {len(consumers)}")
    for i, (consumer, info) in enumerate(zip(consumers, infos, strict=True)):
        prefix = f"{i}:"
        consumer.restore(engine, {k[len(prefix):]: t for k, t in state.tensors.items() if k.startswith(prefix)},
                         info)
    return state.info["blocks"]


def put_parameters(model: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Parameters of ``model`` (a model built on the meta device) set to ``tensors``, by name, as
    ``LazyWeights.onload`` sets those it reads."""
    for name, t in tensors.items():
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, nn.Parameter(t, requires_grad=False))
