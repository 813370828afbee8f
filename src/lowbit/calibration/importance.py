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

import inspect
from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear

from ..errors import InputError
from ..eval.encoder import BATCH as ENCODER_BATCH
from ..eval.encoder import MAX_TOKENS
from ..eval.protocol import DEFAULT_WINDOW, paragraphs, read_text
from ..models.loader import CAUSAL_LM, ENCODER
from ..progress import progress_bar

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
    Each forward call's sums are float32 and are added up in float64 (see ``_square_sums``); only the running sums
    are kept, never the activations. The means are returned as float32: one below its range (~1e-45) reads 0, as
    in llama.cpp's float imatrix (all-MiniLM-L6-v2 has [CLS] channels of ~1e-32): allow zero importance.
    A NaN or Inf in an activation is a ValueError naming the layer; so is a layer that received no input (the
    forward pass never calls it).
    """
    if len(batches) == 0:
        raise InputError("no calibration inputs given")
    targets = _targets(model, layers)
    sums: dict[str, torch.Tensor | None] = dict.fromkeys(targets)
    counts = dict.fromkeys(targets, 0)
    state = {"mask": None, "batch": 0, "input": None, "sums": None}

    def hook_for(name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            # q/k/v (and gate/up) projections read one tensor: its sums are computed once. Holding that tensor
            # until the next hook keeps its id from being reused by another.
            if x is not state["input"]:
                state["input"], state["sums"] = x, _square_sums(x.detach(), state["mask"])
            s, n = state["sums"]
            if not torch.isfinite(s).all():  # squares are >= 0: a NaN sum means a NaN input, an Inf sum an Inf
                what = "NaN" if torch.isnan(s).any() else "Inf"
                bad = int((torch.isnan(s) if what == "NaN" else torch.isinf(s)).sum())
                raise InputError(f"calibration activations of {name} hold {what}: in {bad} of its {s.numel()} "
                                 f"input channels (calibration batch {state['batch'] + 1} of {len(batches)}); "
                                 "the model does not compute finite values on this text")
            sums[name] = s if sums[name] is None else sums[name] + s
            counts[name] += n
        return hook

    try:
        forward_hooked(model, batches, targets, hook_for, state, progress=progress, label=label)
    finally:
        state["input"] = state["sums"] = None
    idle = [name for name, n in counts.items() if n == 0]
    if idle:
        raise InputError(f"nn.Linear {idle[0]} received no input during calibration ({len(idle)} such layers): "
                         "the forward pass never calls it; leave it out of layers=")
    means = {name: (sums[name] / counts[name]).float() for name in targets}
    big = next((name for name, m in means.items() if not torch.isfinite(m).all()), None)
    if big is not None:
        peak = (sums[big] / counts[big]).max().item()
        raise InputError(f"the mean square of {big}'s calibration activations reaches {peak:.3g}, beyond float32 "
                         "(3.4e38): the model's activations are out of range on this text")
    return means


def forward_hooked(model: nn.Module, batches: Sequence, targets: dict[str, nn.Module], hook_for, state: dict, *,
                   progress: bool = True, label: str = "calibrating") -> None:
    """Run ``batches`` (``collect_importance``'s docstring) through ``model`` in inference mode with the forward
    pre-hook ``hook_for(name)`` (``with_kwargs``) on each of ``targets``; the hooks are always removed again.
    While a batch runs, ``state["batch"]`` is its index and ``state["mask"]`` its ``attention_mask`` as bool, or
    None (``token_rows`` drops the padded rows with it)."""
    extra = _skip_head(model, targets)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    was_training = model.training
    handles = []
    try:
        for name, module in targets.items():  # appended one by one: a failure halfway still removes the first ones
            handles.append(module.register_forward_pre_hook(hook_for(name), with_kwargs=True))
        model.eval()
        rows = sum(_rows(b) for b in batches)
        with torch.inference_mode(), progress_bar(rows, label, enabled=progress) as advance:
            for i, batch in enumerate(batches):
                state["batch"] = i
                if isinstance(batch, Mapping):
                    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                    mask = inputs.get("attention_mask")
                    state["mask"] = None if mask is None else mask.bool()
                    model(**inputs, **extra)
                else:
                    state["mask"] = None
                    model(batch.to(device), **extra)
                for _ in range(_rows(batch)):
                    advance()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer input as ``(tokens, features)``, the padded tokens (``mask`` False) left out. Only an input
    shaped ``(B, T, features)`` like the mask is masked; others (BERT's pooler) keep every row."""
    if mask is not None and x.dim() == mask.dim() + 1 and x.shape[:-1] == mask.shape:
        x = x[mask]
    return x.reshape(-1, x.shape[-1])


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


def _square_sums(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """``(sum over tokens of x^2 per channel as float64, tokens)``, padding (``mask`` False) left out.

    One call's sum runs in float32 (torch sums in blocks, so its error stays near float32's 6e-8 for the few
    thousand tokens of a batch) and calls are added up in float64. Summing in float64 took 1.9 ms for a 512 x 576
    input against 0.11 ms in float32 and 6.2 ms for that input's q_proj matmul (best of 15 runs, 2 CPU threads).
    A square beyond float32's range (|x| > 1.8e19) is summed again in float64, so only a true NaN or Inf input
    gives a non-finite sum.
    """
    x = token_rows(x, mask)
    s = (x * x).sum(0)
    if not torch.isfinite(s).all():
        s = x.double().square().sum(0)
    return s.double(), x.shape[0]


def _check_counts(window: int, scored: int, count: int) -> None:
    if window < 1 or scored < 0 or count < 1:
        raise InputError(f"need window >= 1, scored >= 0 and --calibrate >= 1, got window={window}, "
                         f"scored={scored}, calibrate={count}")


def _targets(model: nn.Module, layers) -> dict[str, nn.Linear]:
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


def _skip_head(model: nn.Module, targets: dict[str, nn.Linear]) -> dict:
    """``{"logits_to_keep": 1}`` when the model's output head is not calibrated and transformers can skip it.

    The LM head of a causal LM is a large matmul (576 x 49152 for SmolLM2) computed for every token; with it out
    of ``targets`` only the last position's logits are made (llama-imatrix skips the output tensor by default too:
    tools/imatrix README, ``--process-output``). Hidden states, and so every other layer's input, are unchanged.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if head is None or any(m is head for m in targets.values()):
        return {}
    try:
        accepts = "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        accepts = False
    return {"logits_to_keep": 1} if accepts else {}


def _rows(batch) -> int:
    """Windows, paragraphs or rows in one batch: what the progress bar counts."""
    first = next(iter(batch.values())) if isinstance(batch, Mapping) else batch
    return int(first.shape[0]) if isinstance(first, torch.Tensor) and first.dim() > 1 else 1
