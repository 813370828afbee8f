"""A causal LM run block by block over every scored window: how ``compare`` and ``eval`` run one.

The inputs of the first transformer block are caught for every window at once (``lowbit.calibration.engine``'s
``BlockPass``); each block then runs on all of them and its outputs become the next block's inputs; only then is
each window's forward finished, one window at a time, with every block replaying the last one's outputs
(``BlockPass.replaying``), so what follows the blocks (final norm, output head, log-softmax) is the model's own
code run as in a full forward. Memory holds one block's weights, the hidden states of every window (16 windows
of 512 tokens of an 8B model: 134 MB, as inputs and again as outputs) and one window's logits (512 x 128256
float32: 262 MB), never the model nor the logits of every window. A block run on caught inputs computes the
floats it computes inside a full forward (tests/calibration/test_engine.py), so the log-probabilities are
``next_token_logprobs`` of the whole model, to the bit (tests/eval/test_blockwise.py).

``through_blocks`` runs several streams through the same blocks, each block brought in once for all of them
(sensitivity's measurements of one layer each, ``lowbit.planning.sensitivity``).

Where a block's weights come from is the ``Resident``'s business: already in memory (``Resident``); a quantized
model's dequantized per block (``Dequantized``); read from the checkpoint of a model built on the meta device
(``Onloaded``, ``lowbit.models.lazy``), or read and rounded there (``lowbit.eval.streamed``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from ..calibration.engine import Block, BlockPass, Stream, transformer_blocks
from ..errors import InputError
from ..layers.keep_dtype import round_state
from ..layers.linear import QuantLinear
from ..progress import progress_bar


class Resident:
    """A model whose weights are all in memory, run as it is. A subclass brings weights in while a block runs
    (``block``) and, for the whole run, those outside the blocks (``outside``: embedding, final norm, head)."""

    def __init__(self, model: nn.Module):
        self.model = model

    @contextmanager
    def outside(self, blocks: list[str]) -> Iterator[None]:
        """While open, what lies outside ``blocks`` (their qualified names) can run."""
        yield

    @contextmanager
    def block(self, name: str) -> Iterator[None]:
        """While open, block ``name`` can run."""
        yield


def resident(model: nn.Module | Resident) -> Resident:
    """``model`` as a ``Resident``: a plain module runs as it is."""
    return model if isinstance(model, Resident) else Resident(model)


class Dequantized(Resident):
    """A quantized model in memory: each QuantLinear's weight dequantized while its block runs and dropped after
    (``QuantLinear.materialize``: the numbers of the packed path, tests/layers/test_surgery.py), those outside
    the blocks for the whole run; a layer materialized before is left so. Memory: the packed model and one
    block in float32, where materializing the whole model would hold it all in float32."""

    @contextmanager
    def outside(self, blocks: list[str]) -> Iterator[None]:
        inside = {id(m) for name in blocks for m in self.model.get_submodule(name).modules()}
        with materialized(m for m in self.model.modules() if id(m) not in inside):
            yield

    @contextmanager
    def block(self, name: str) -> Iterator[None]:
        with materialized(self.model.get_submodule(name).modules()):
            yield


@contextmanager
def materialized(modules: Iterable[nn.Module]) -> Iterator[None]:
    """The QuantLinears among ``modules`` that are not materialized, materialized while open."""
    fresh = [m for m in modules if isinstance(m, QuantLinear) and not m.materialized]
    for m in fresh:
        m.materialize()
    try:
        yield
    finally:
        for m in fresh:
            m.release()


class Onloaded(Resident):
    """A model built on the meta device (``lowbit.models.lazy.load_lazily``): each block's parameters read from
    the checkpoint while it runs and put back on the meta device after; those outside the blocks read for the
    run and put back after it. ``keep``: every float tensor read is rounded through that dtype (``--keep-dtype``,
    as ``layers.keep_dtype.round_state`` rounds a whole model)."""

    def __init__(self, model: nn.Module, weights, keep: torch.dtype | None = None):
        super().__init__(model)
        self.weights, self.keep = weights, keep

    @contextmanager
    def outside(self, blocks: list[str]) -> Iterator[None]:
        self.weights.onload(self.model, skip=block_parameters(self.model, blocks))
        try:
            self.round(self.model)  # the blocks are on the meta device: nothing of theirs to round
            yield
        finally:
            self.put_back()

    @contextmanager
    def block(self, name: str) -> Iterator[None]:
        self.weights.onload(self.model, under=name)
        try:
            self.round(self.model.get_submodule(name))
            yield
        finally:
            self.weights.offload(self.model, name)

    def round(self, module: nn.Module) -> None:
        if self.keep is not None:
            round_state(module, self.keep)

    def put_back(self) -> None:
        """Every parameter back on the meta device, and a tied head tied again to its (meta) embedding: the
        offload replaced the tied tensor under its first name only, and the head must not keep the old one."""
        self.weights.offload(self.model, "")
        self.model.tie_weights()


def block_parameters(model: nn.Module, blocks: list[str]) -> list[str]:
    """The qualified names of every parameter of ``blocks``."""
    return [f"{b}.{n}" for b in blocks for n, _ in model.get_submodule(b).named_parameters(remove_duplicate=False)]


def block_names(model: nn.Module) -> list[str]:
    """The qualified names of ``model``'s transformer blocks, in order; none for a model without (a toy), which
    then runs whole."""
    try:
        blocks = transformer_blocks(model)
    except InputError:
        return []
    names = {id(m): n for n, m in model.named_modules()}
    return [names[id(b)] for b in blocks]


def window_logprobs(model: nn.Module | Resident, ids: torch.Tensor, each: Callable[[int, torch.Tensor], None], *,
                    label: str, progress: bool = True) -> None:
    """``each(i, logprobs)`` for every window ``i`` of ``ids`` (n, W), in order: its (W-1, vocab) float32
    log-probabilities of each next token, as ``next_token_logprobs`` of the whole model gives them."""
    run = resident(model)
    blocks = block_names(run.model)
    with progress_bar(len(blocks) + len(ids), label, enabled=progress) as advance, torch.inference_mode(), \
            run.outside(blocks):
        engine = BlockPass(run.model, [window[None] for window in ids])  # catches the first block's inputs
        stream = engine.stream()
        through_blocks(run, engine, blocks, [stream], each=advance)
        with engine.replaying(len(blocks), stream) as state:
            for i, window in enumerate(ids):
                state["batch"] = i
                each(i, next_token_logprobs(run.model, window))
                advance()


def through_blocks(run: Resident, engine: BlockPass, blocks: list[str], streams: list[Stream], start: int = 0, *,
                   each: Callable[[], None] = lambda: None) -> None:
    """Every one of ``streams`` advanced through ``blocks[start:]`` (qualified names), each block brought into
    memory once (``run.block``) and run on every stream in turn; ``each()`` after each block."""
    for i in range(start, len(blocks)):
        with run.block(blocks[i]):  # the module is looked up inside: a Resident may put another in its place
            module = run.model.get_submodule(blocks[i])
            for stream in streams:
                stream.advance(Block(i, module, engine.masks, {}).run(stream))
        each()


@torch.inference_mode()
def next_token_logprobs(model, window: torch.Tensor) -> torch.Tensor:
    """(W,) token ids -> (W-1, vocab) float32 log-probabilities of each next token, from one forward of ``model``
    (the tail of one when its blocks replay)."""
    logits = model(window[None]).logits[0, :-1].float()
    # not torch.log_softmax: its fused CPU kernel's normalisation is off by ~1e-5 (sum p - 1),
    # which would bias every KL by as much; logsumexp is accurate to ~1e-7.
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))
