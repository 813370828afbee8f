"""Calibration for activation-aware quantization (``nf4@amse``): per nn.Linear, the mean square of each input channel.

For a layer ``y = x @ W.T`` the importance of input channel j is ``mean over calibration tokens of x_j^2``, the
diagonal of ``X^T X / n_tokens``: what llama.cpp's importance matrix holds (llama.cpp tools/imatrix/imatrix.cpp,
``collect_imatrix`` sums x^2 per input column of every matmul and divides by the count).

Calibration text never overlaps what is scored. Causal LMs: the text is tokenized exactly as
``protocol.token_windows`` does and the windows right after the scored ones are used (with the defaults, windows
17-32 = tokens 8,192-16,383). Encoders: the paragraphs (``protocol.paragraphs``) after the scored ones, each
truncated as the protocol truncates them (``encoder.MAX_TOKENS``), as many as fill ``count`` x 512 tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..errors import InputError
from ..eval.encoder import BATCH as ENCODER_BATCH
from ..eval.encoder import MAX_TOKENS
from ..eval.protocol import DEFAULT_WINDOW, paragraphs, read_text
from ..models.loader import CAUSAL_LM, ENCODER
from .carry import carried_stream, resumed_stream
from .engine import Block, BlockPass, Consumer, serve
from .statistics import IMPORTANCE

# 16 windows of 512 tokens = 8,192 tokens. Each window is one forward pass, ~1.2 s for SmolLM2 on 2 CPU threads,
# and the mean of x^2 per channel settles fast: on the embedded SmolLM2 (default protocol, mean KL) nf4@amse
# reached 0.1188 / 0.1163 / 0.1186 and nf4/32+dq@amse 0.0872 / 0.0884 / 0.0901 with 8 / 16 / 64 windows, while
# 64 windows (the 32,768 tokens llama.cpp's imatrix read in the README's comparison) take 70 s of the 60 s
# budget for a whole quantization. 16: 21 s.
DEFAULT_CALIBRATE = 16
# Windows per forward pass. On 2 CPU threads batches of 1, 2, 4 and 8 windows ran within noise of each other
# (8.5-9.5 s a window of SmolLM2's base model on a loaded machine), so the smallest activation memory wins.
CAUSAL_BATCH = 1


def calibration_windows(tokenizer, text: str, name: str, *, window: int = DEFAULT_WINDOW, scored: int,
                        count: int | None = DEFAULT_CALIBRATE) -> torch.Tensor:
    """``(count, window)`` int64: windows ``scored .. scored+count-1`` of ``text``, tokenized as ``token_windows`` does;
    ``count`` None: every whole window after the scored ones (``lowbit qat`` trains on them all).

    A text that holds fewer than ``count`` windows after the ``scored`` ones is an error, never a silent cap.
    """
    _check_counts(window, scored, 1 if count is None else count)
    # the same call as protocol.token_windows, so window k here is window k there
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
    held = ids.numel() // window
    after = held - scored
    if after <= 0:
        asked = "" if count is None else f"; asked for {count} calibration windows"
        raise InputError(f"text {name} holds {held} windows of {window} tokens, none after the {scored} scored "
                         f"ones{asked}: use a longer --text or fewer --windows")
    count = after if count is None else count
    if after < count:
        raise InputError(f"text {name} holds {after} windows of {window} tokens after the {scored} scored ones; "
                         f"asked for {count}: use --calibrate {after} or fewer, or a longer --text")
    return ids[scored * window: (scored + count) * window].view(count, window)


def calibration_paragraphs(tokenizer, text: str, name: str, *, scored: int, count: int = DEFAULT_CALIBRATE,
                           window: int = DEFAULT_WINDOW, max_tokens: int = MAX_TOKENS) -> list[str]:
    """The paragraphs after the ``scored`` ones, in order, as many as hold ``count * window`` tokens.

    Tokens are counted as the encoder protocol feeds them: special tokens included, each paragraph truncated to
    ``max_tokens``. The last paragraph may overshoot the target; it is kept whole.
    """
    _check_counts(window, scored, count)
    rest = paragraphs(text, limit=None)[scored:]
    lengths = [len(ids) for ids in tokenizer(rest, truncation=True, max_length=max_tokens)["input_ids"]] if rest else []
    need, total = count * window, 0
    for i, n in enumerate(lengths):
        total += n
        if total >= need:
            return rest[: i + 1]
    fits = total // window
    advice = f"use --calibrate {fits} or fewer, or a longer --text" if fits else "use a longer --text"
    raise InputError(f"text {name} holds {total} tokens ({fits} x {window}) in the {len(rest)} paragraphs after the "
                     f"{scored} scored ones; asked for {count} x {window}: {advice}")


def encoder_batches(tokenizer, texts: list[str], *, batch: int = ENCODER_BATCH,
                    max_tokens: int = MAX_TOKENS) -> list[dict[str, torch.Tensor]]:
    """Padded batches of ``batch`` texts, truncated as ``encoder.embed`` does; ``collect_importance`` counts only
    unpadded tokens. Texts are batched in order of length (a mean does not depend on the order): the default
    calibration paragraphs in text order would be 56% padding (74,446 tokens computed for 32,812), sorted 5%."""
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_tokens)["input_ids"]]
    ordered = [texts[i] for i in sorted(range(len(texts)), key=lengths.__getitem__)]
    return [dict(tokenizer(ordered[i: i + batch], truncation=True, max_length=max_tokens, padding=True,
                           return_tensors="pt")) for i in range(0, len(ordered), batch)]


def collect_importance(model: nn.Module, batches: Sequence, *, layers=None, progress: bool = True,
                       label: str = "calibrating") -> dict[str, torch.Tensor]:
    """``{name: (in_features,) float32}``: per nn.Linear, the mean of x^2 per input channel over every token.

    ``batches``: tensors (the forward's first argument: input ids ``(B, T)`` for transformers) or mappings of
    forward keyword arguments. A mapping's ``attention_mask`` marks padding: a layer input shaped ``(B, T, in)`` like
    the mask counts only its unpadded tokens (inputs of another shape, such as BERT's pooler, count every row).
    ``layers``: qualified names (as ``model.named_modules()`` gives them) to collect, default every nn.Linear.
    The model is run block by block (``lowbit.calibration.engine``); the sums are ``statistics.IMPORTANCE``'s.
    The means are returned as float32: one below its range (~1e-45) reads 0, as in llama.cpp's float imatrix
    (all-MiniLM-L6-v2 has [CLS] channels of ~1e-32): allow zero importance. A NaN or Inf in an activation is an
    InputError naming the layer; so is a layer that received no input (the forward pass never calls it).
    """
    if len(batches) == 0:
        raise InputError("no calibration inputs given")
    consumer = Importance(linear_layers(model, layers))
    serve(model, batches, [consumer], progress=progress, label=label)
    return {name: consumer.found[name] for name in consumer.layers}


class Importance(Consumer):
    """``IMPORTANCE`` of ``layers`` (names) on the model as the walk finds it (after the consumers before it have
    changed each block), in ``found``; ``count``: on the first ``count`` batches only (default all)."""

    def __init__(self, layers, count: int | None = None):
        self.layers, self.count, self.found, self._stream = tuple(layers), count, {}, None

    def block(self, engine: BlockPass, block: Block) -> None:
        if self._stream is None:
            self._stream = engine.stream(self.count)
        found, outputs = block.statistics(self._stream, block.layers(self.layers), [IMPORTANCE])
        self.found.update(found[IMPORTANCE])
        self._stream.advance(outputs)

    def tail(self, engine: BlockPass, layers: dict[str, nn.Module]) -> None:
        self.found.update(engine.tail(layers, [IMPORTANCE], replay=self._stream, count=self.count)[IMPORTANCE])

    def carried(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Its stream, and the importance found so far (``found.LAYER``: a few kB a layer)."""
        tensors, stream = carried_stream(self._stream)
        return {**tensors, **{f"found.{name}": t for name, t in self.found.items()}}, {"stream": stream}

    def restore(self, engine: BlockPass, tensors, info: dict) -> None:
        self._stream = resumed_stream(engine, tensors, info["stream"], self.count)
        self.found = {k.removeprefix("found."): t for k, t in tensors.items() if k.startswith("found.")}


def calibrate(model: nn.Module, tokenizer, info_kind: str, text=None, *, window: int = DEFAULT_WINDOW, scored: int,
              count: int = DEFAULT_CALIBRATE, layers=None, progress: bool = True) -> dict[str, torch.Tensor]:
    """``collect_importance`` over the calibration inputs of the evaluation text (``--text``; None: the default).

    ``info_kind``: ``ModelInfo.kind``. ``scored``: how many windows (causal LM) or paragraphs (encoder) the
    protocol scores (``Evaluation.protocol.windows`` or ``len(Evaluation.texts)``); calibration starts after them.
    """
    batches, label = calibration_batches(tokenizer, info_kind, text, window=window, scored=scored, count=count)
    return collect_importance(model, batches, layers=layers, progress=progress, label=label)


def calibration_batches(tokenizer, info_kind: str, text=None, *, window: int = DEFAULT_WINDOW, scored: int,
                        count: int = DEFAULT_CALIBRATE) -> tuple[list, str]:
    """``(batches, what they are)``: the forward inputs of the calibration split (``calibrate``'s docstring)."""
    name, body = read_text(text)
    if info_kind == CAUSAL_LM:
        ids = calibration_windows(tokenizer, body, name, window=window, scored=scored, count=count)
        return list(ids.split(CAUSAL_BATCH)), f"calibrating on {count} windows after the {scored} scored"
    if info_kind == ENCODER:
        texts = calibration_paragraphs(tokenizer, body, name, scored=scored, count=count, window=window)
        return encoder_batches(tokenizer, texts), f"calibrating on {len(texts)} paragraphs after the {scored} scored"
    raise InputError(f"unknown model kind {info_kind!r}: expected {CAUSAL_LM!r} or {ENCODER!r}")


def _check_counts(window: int, scored: int, count: int) -> None:
    if window < 1 or scored < 0 or count < 1:
        raise InputError(f"need window >= 1, scored >= 0 and --calibrate >= 1, got window={window}, "
                         f"scored={scored}, calibrate={count}")


def linear_layers(model: nn.Module, layers=None) -> dict[str, nn.Linear]:
    """The nn.Linear layers named by ``layers`` (``collect_importance``'s docstring), default every one a hook sees."""
    # MultiheadAttention's out_proj is never called as a module (it reads the weight directly), so no hook would
    # ever fire; nn.surgery leaves it out of quantization for the same reason (torch.ao skips it too)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    if layers is None:
        targets = {n: m for n, m in linears.items() if not isinstance(m, NonDynamicallyQuantizableLinear)}
        if not targets:
            raise InputError(f"{type(model).__name__} has no nn.Linear layer to calibrate")
        return targets
    wanted = [layers] if isinstance(layers, str) else list(layers)
    if not wanted:
        raise InputError("layers= is empty: name at least one nn.Linear to calibrate, or pass None for all")
    missing = [n for n in wanted if n not in linears]
    if missing:
        example = next(iter(linears), None)
        raise InputError(f"no nn.Linear named {missing[0]!r} in the model"
                         + (f" (names look like {example!r})" if example else " (it has none)"))
    return {n: linears[n] for n in dict.fromkeys(wanted)}
