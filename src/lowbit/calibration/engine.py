"""The calibration engine: the model run block by block on the calibration batches, serving what methods ask for.

The inputs of the first transformer block are caught once for every batch (one forward that stops there); then
each block is run on them and its outputs become the next block's inputs, as the GPTQ reference code does
(github.com/IST-DASLab/gptq, ``llama.py``, ``llama_sequential``). A block run on caught inputs computes the
same floats as inside a full forward: same module, same arguments (tests/calibration/test_engine.py holds it to
the bit on SmolLM2 and all-MiniLM-L6-v2). Only one block's inputs (for every batch) and the statistics of its
layers are alive at a time, so memory follows one block, not the depth.

A method's use of the walk is a ``Consumer``: at each block (``Block``) it asks for its layers' statistics on its
own ``Stream`` of inputs (``Block.statistics``: explicit inputs and outputs, the unit of work a scheduler may
move), may change the block's weights, and advances its stream with what the block passes on. Consumers whose
streams differ (GPTQ feeds each block what the quantized blocks before it produce; the importance reads the model
as it is) each keep their own, of one block each. Layers outside the blocks (an unexcluded lm_head, BERT's
pooler) are served after the last block (``BlockPass.tail``): by a forward in which every block replays the
outputs a consumer's stream reached (only what follows the blocks is computed), or by full forwards of the model
as it then is where that stream is not the one the layers see (GPTQ's tail reads the unquantized model).

A model larger than memory is built on the meta device and read block by block (``weights``, a
``lowbit.models.lazy.LazyWeights``): what runs before the first block is read in to catch its inputs and freed,
each block's parameters are read in place before the consumers see it, and its linear weights are put back on the
meta device once ``after_block`` has rounded and written its layers, so memory holds one block's weights, the
consumers' streams (``batches x tokens x hidden`` floats each) and one block's statistics. llm-compressor's
"sequential onloading" walks a model the same way. A pass can be continued from the end of any block
(``lowbit.calibration.carry``).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..cluster.pool import SERIAL, Pool
from ..errors import InputError
from ..files.partial import ProducerState
from ..progress import progress_bar
from .carry import carried, restore
from .statistics import Statistics

if TYPE_CHECKING:
    from ..models.lazy import LazyWeights


class _Caught(Exception):
    """Raised by the hook on the first block once its inputs are stored: the rest of the forward is not needed."""


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks: the longest nn.ModuleList holding linear layers."""
    blocks = _blocks(model)
    if blocks is None:
        raise InputError(f"{type(model).__name__} holds no nn.ModuleList of blocks: it cannot be run block by block")
    return blocks


def _blocks(model: nn.Module) -> nn.ModuleList | None:
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)
             and any(isinstance(x, nn.Linear) for x in m.modules())]
    return max(lists, key=len) if lists else None


def call(model: nn.Module, batch, **extra):
    """One forward of ``batch`` (input ids, or a mapping of keyword arguments) as calibration runs it: a causal
    LM without its key/value cache (a cache passed to a replayed block would grow)."""
    if isinstance(batch, Mapping):
        return model(**batch, use_cache=False, **extra) if "input_ids" in batch and causal(model) else \
            model(**batch, **extra)
    return model(batch, use_cache=False, **extra) if causal(model) else model(batch, **extra)


def causal(model: nn.Module) -> bool:
    return hasattr(model, "generation_config") or hasattr(model, "lm_head")


def first(out):
    return out[0] if isinstance(out, tuple) else out


class Stream:
    """One chain of block inputs, ``(args, kwargs)`` per batch: what the block being walked receives.
    ``previous``: the raw outputs of the block before (None at the first), which a replay stands in with."""

    def __init__(self, inputs: list[tuple[tuple, dict]]):
        self.inputs, self.previous = inputs, None

    def advance(self, outputs: list) -> None:
        """The next block's inputs: ``outputs`` (one per batch, as the block returned them) in place of the first
        argument."""
        self.inputs = [((first(out), *a[1:]), k) for out, (a, k) in zip(outputs, self.inputs, strict=True)]
        self.previous = outputs


class Block:
    """One transformer block of a walk: ``index`` in the model's blocks, ``module``, and the batch masks."""

    def __init__(self, index: int, module: nn.Module, masks: list, names: dict[int, str]):
        self.index, self.module, self._masks, self._names = index, module, masks, names

    def layers(self, wanted: Iterable[str]) -> dict[str, nn.Module]:
        """The layers of ``wanted`` (qualified names) inside this block, in the block's order."""
        wanted = set(wanted)
        return {self._names[id(m)]: m for m in self.module.modules() if self._names.get(id(m)) in wanted}

    def statistics(self, stream: Stream, layers: Mapping[str, nn.Module] = (), wants: Iterable[str] = (), *,
                   outputs: bool = True, threshold: float | None = None
                   ) -> tuple[dict[str, dict[str, torch.Tensor]], list | None]:
        """``({statistic: {layer: tensor}}, outputs)``: the block run on every input of ``stream`` with ``wants``
        (``lowbit.calibration.statistics``) collected for ``layers``; ``outputs``: keep what it returns, per batch
        (else None); ``threshold``: the ``OUTLIERS`` magnitude."""
        stats = Statistics(dict(layers), wants, len(stream.inputs), threshold=threshold)
        outs = [] if outputs else None
        with stats.hooked(), torch.inference_mode():
            for b, (a, k) in enumerate(stream.inputs):
                stats.batch, stats.mask = b, self._masks[b]
                out = self.module(*a, **k)
                if outs is not None:
                    outs.append(out)
        return stats.result(), outs

    def run(self, stream: Stream) -> list:
        """What the block, as it now is, returns for each input of ``stream``."""
        return self.statistics(stream)[1]


class BlockPass:
    """``model`` on ``batches`` (input-id tensors, or mappings of forward keyword arguments such as an encoder's
    ``attention_mask``), block by block. The first block's inputs are caught when it is made. ``pool``: where the
    consumers run the independent work of one block's layers (``lowbit.cluster.pool``: GPTQ layer by layer)."""

    def __init__(self, model: nn.Module, batches: Sequence, *, weights: LazyWeights | None = None,
                 pool: Pool = SERIAL):
        if len(batches) == 0:
            raise InputError("no calibration inputs given")
        self.model, self.weights, self.pool = model, weights, pool
        device = torch.device("cpu") if weights is not None else \
            next((p.device for p in model.parameters()), torch.device("cpu"))
        self.batches = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
                        if isinstance(b, Mapping) else b.to(device) for b in batches]
        self.masks = [b["attention_mask"].bool() if isinstance(b, Mapping) and b.get("attention_mask") is not None
                      else None for b in self.batches]
        self.blocks = _blocks(model)
        self._names = {id(m): n for n, m in model.named_modules()}
        if weights is None:
            self._caught = self._catch()
            return
        if self.blocks is None:
            raise InputError(f"{type(model).__name__} read block by block cannot be run whole: load it with "
                             "load_model")
        weights.onload(model, skip=self._inside() | _head_weights(model))  # what runs before the first block
        try:
            self._caught = self._catch()
        finally:
            weights.offload(model, skip=self._inside())

    def _catch(self) -> list[tuple[tuple, dict]]:
        caught = []

        def hook(module, args, kwargs):
            caught.append((args, kwargs))
            raise _Caught

        if not self.blocks:
            return caught
        handle = self.blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with torch.inference_mode():
                for batch in self.batches:
                    with contextlib.suppress(_Caught):
                        call(self.model, batch)
        finally:
            handle.remove()
        return caught

    def stream(self, count: int | None = None) -> Stream:
        """A new chain starting at the first block's caught inputs (the tensors are shared, never written);
        ``count``: of the first ``count`` batches only."""
        return Stream(list(self._caught[:count]))

    def name_of(self, module: nn.Module) -> str:
        """The qualified name of ``module``, a block or a module in one."""
        return self._names[id(module)]

    def block_of(self, names: Iterable[str]) -> dict[str, int | None]:
        """Each layer's block index; None for a layer outside the blocks."""
        where = {}
        for i, block in enumerate(self.blocks or ()):
            for m in block.modules():
                where.setdefault(id(m), i)
        modules = dict(self.model.named_modules())
        return {n: where.get(id(modules[n])) for n in names}

    def walk(self, last: int | None = None, *, start: int = 0) -> Iterable[Block]:
        """The blocks in order, from block ``start`` through block ``last`` (default every one). A model read
        block by block (``weights``) has each block's parameters read in before it is handed out; ``release``
        frees them."""
        blocks = list(self.blocks or ())
        for i, module in enumerate(blocks[: len(blocks) if last is None else last + 1]):
            if i < start:
                continue
            if self.weights is not None:
                self.weights.onload(self.model, under=self._names[id(module)])
            yield Block(i, module, self.masks, self._names)

    def release(self, block: Block, keep: Collection[str] = ()) -> None:
        """A model read block by block: the weights of ``block``'s ``nn.Linear`` layers put back on the meta
        device, but ``keep`` (parameter names). Its other tensors (norms, biases: kilobytes) and any layer
        swapped in stay."""
        if self.weights is None:
            return
        for module in block.module.modules():
            name = f"{self._names[id(module)]}.weight"
            if type(module) is nn.Linear and not module.weight.is_meta and name not in keep:
                module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"), requires_grad=False)

    def tail(self, layers: Mapping[str, nn.Module], wants: Iterable[str], replay: Stream | None = None, *,
             count: int | None = None, threshold: float | None = None) -> dict[str, dict[str, torch.Tensor]]:
        """``wants`` of ``layers`` (outside the blocks) from forwards of the model as it now is, on the first
        ``count`` batches (default all). ``replay``: a stream of as many batches walked through the last block,
        whose outputs then stand in for every block (only what follows the blocks is computed); None: full
        forwards. An output head that is not asked for is skipped where transformers can (``logits_to_keep=1``).
        ``threshold``: the ``OUTLIERS`` magnitude."""
        batches = self.batches[:count]
        stats = Statistics(dict(layers), wants, len(batches), threshold=threshold)
        extra = skip_head(self.model, layers)
        if self.weights is not None:
            if replay is None:
                raise InputError(f"{', '.join(layers)}: outside the transformer blocks, calibrated on full forwards "
                                 "of the model, which a model read block by block cannot run: load it with "
                                 "load_model, or leave the layer out of the plan")
            self.weights.onload(self.model, skip=self._inside())
        try:
            with stats.hooked(), torch.inference_mode(), self.replaying(len(self.blocks or ()), replay) as state:
                for b, batch in enumerate(batches):
                    stats.batch, stats.mask, state["batch"] = b, self.masks[b], b
                    call(self.model, batch, **extra)
        finally:
            if self.weights is not None:
                self.weights.offload(self.model, skip=self._inside())
        return stats.result()

    def _inside(self) -> set[str]:
        """The names of the blocks' parameters."""
        return {f"{self._names[id(b)]}.{n}" for b in self.blocks or () for n, _ in b.named_parameters()}

    @contextlib.contextmanager
    def replaying(self, count: int, stream: Stream | None):
        """Blocks ``0 .. count-1`` replaced by ``stream.previous`` (the outputs of block ``count-1``, one per
        batch) while open; yields the state whose ``"batch"`` says which batch runs. ``stream`` None or ``count``
        0: nothing replaced."""
        state = {"batch": 0}
        blocks = self.blocks if stream is not None and count else []
        originals = {i: blocks[i] for i in range(count if blocks else 0)}
        try:
            for i in originals:
                blocks[i] = _Replay(stream.previous, state)
            yield state
        finally:
            for i, block in originals.items():
                blocks[i] = block


def _head_weights(model: nn.Module) -> set[str]:
    """The output head's parameter names (an LM head is read only where the tail computes it)."""
    head = _output_head(model)
    if head is None:
        return set()
    prefix = next(n for n, m in model.named_modules() if m is head)
    return {f"{prefix}.{n}" for n, _ in head.named_parameters()}


class _Replay(nn.Module):
    """Stands in for a block: returns what the block before the first one computed returned on the current batch,
    computing nothing (every replayed block returns it: only the last one's output is read on)."""

    def __init__(self, outputs: list, state: dict):
        super().__init__()
        self._outputs, self._state = outputs, state

    def forward(self, *args, **kwargs):
        return self._outputs[self._state["batch"]]


class Consumer:
    """A method's part in a walk. ``layers``: the qualified names of the layers it asks about (the walk runs as
    far as the last block holding one, and ``tail`` gets the others)."""

    layers: tuple[str, ...] = ()

    def block(self, engine: BlockPass, block: Block) -> None:
        """Its work at one block: statistics on its stream, changes to the block, the stream advanced."""

    def tail(self, engine: BlockPass, layers: dict[str, nn.Module]) -> None:
        """Its work on ``layers`` (of its own) outside the blocks, after the last block."""

    def finish(self, *, progress: bool = True) -> None:
        """Its work once the pass is done (``+awq`` records what it folded on the model)."""

    def carried(self) -> tuple[dict[str, torch.Tensor], Any]:
        """What it carries from one block to the next (its stream's hidden states, what it gathers over the
        blocks), as tensors by name and JSON, from which ``restore`` makes it again: a pass that gives it can be
        continued from a block's end (``serve(at_boundary=)``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be continued from a block's end")

    def restore(self, engine: BlockPass, tensors: Mapping[str, torch.Tensor], info: Any) -> None:
        """Its state again from what ``carried`` gave, before the walk goes on (``serve(resumed=)``)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be continued from a block's end")


def serve(model: nn.Module, batches: Sequence, consumers: Sequence[Consumer], *, progress: bool = True,
          label: str = "calibrating", weights: LazyWeights | None = None,
          after_block: Callable[[Block], None] | None = None,
          keep: Collection[str] = (), at_boundary: Callable[[ProducerState], None] | None = None,
          resumed: ProducerState | None = None, pool: Pool = SERIAL) -> BlockPass:
    """One block-by-block pass of ``model`` on ``batches`` serving every consumer, in their order at each block
    (a consumer that changes a block, such as AWQ's fold, comes before those that read the changed block). The
    model runs in eval mode and is left in the mode it was in; everything runs in inference mode (the consumers
    change weights in place).

    ``weights``: ``model`` was built on the meta device (``lowbit.models.lazy.load_lazily``) and is read block by
    block: each block's parameters before the consumers see it, its linear layers' weights (but ``keep``) put back
    on the meta device after ``after_block(block)`` has used them, so memory holds one block. ``after_block``:
    called once the consumers are done with each block; every block is then walked, not only those up to the
    last a consumer asks about.

    ``at_boundary(state)``: called after each block is released with what going on from there needs
    (``BlockPass.carried``; its tensors are not changed after); ``resumed``: such a state, restored before the walk,
    which then starts at the block after it (the blocks before are neither read nor run). ``pool``: the
    ``BlockPass``'s, for the consumers' per-layer work."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            return _serve(model, batches, consumers, progress=progress, label=label, weights=weights,
                          after_block=after_block, keep=keep, at_boundary=at_boundary, resumed=resumed, pool=pool)
    finally:
        model.train(was_training)


def _serve(model, batches, consumers, *, progress, label, weights, after_block, keep, at_boundary,
           resumed, pool) -> BlockPass:
    engine = BlockPass(model, batches, weights=weights, pool=pool)
    start = 0 if resumed is None else restore(engine, consumers, resumed)
    modules = dict(model.named_modules())
    where = engine.block_of({n for c in consumers for n in c.layers})
    outside = [{n: modules[n] for n in c.layers if where[n] is None} for c in consumers]
    # each consumer walks through the last block holding one of its layers, and no further; one with layers outside
    # the blocks through every block (its tail may replay the last one's outputs)
    final = len(engine.blocks or ()) - 1
    lasts = [final if out else max((where[n] for n in c.layers if where[n] is not None), default=-1)
             for c, out in zip(consumers, outside, strict=True)]
    last = final if after_block is not None else max(lasts, default=-1)
    with progress_bar(last + 1 + any(outside), label, enabled=progress) as advance:
        for _ in range(min(start, last + 1)):  # walked by the run this one continues
            advance()
        for block in engine.walk(last, start=start):
            for consumer, mine in zip(consumers, lasts, strict=True):
                if block.index <= mine:
                    consumer.block(engine, block)
            if after_block is not None:
                after_block(block)
            engine.release(block, keep)
            if at_boundary is not None:
                at_boundary(carried(engine, consumers, block.index + 1))
            advance()
        if any(outside):
            for consumer, layers in zip(consumers, outside, strict=True):
                if layers:
                    consumer.tail(engine, layers)
            advance()
    return engine


def skip_head(model: nn.Module, targets: Mapping[str, nn.Module]) -> dict:
    """``{"logits_to_keep": 1}`` when the model's output head is not calibrated and transformers can skip it.

    The LM head of a causal LM is a large matmul (576 x 49152 for SmolLM2) computed for every token; with it out
    of ``targets`` only the last position's logits are made (llama-imatrix skips the output tensor by default too:
    tools/imatrix README, ``--process-output``). Hidden states, and so every other layer's input, are unchanged.
    """
    head = _output_head(model)
    if head is None or any(m is head for m in targets.values()):
        return {}
    try:
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return {"logits_to_keep": 1} if accepts else {}


def _output_head(model: nn.Module) -> nn.Module | None:
    """transformers' output head of ``model`` (``get_output_embeddings``), None where it has none."""
    get_head = getattr(model, "get_output_embeddings", None)
    return get_head() if callable(get_head) else None
