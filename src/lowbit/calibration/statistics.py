"""The statistics calibration serves per ``nn.Linear``, summed by forward pre-hooks on the layers while they run.

Each is written once here and kept exactly as its method has always computed it (the saved bytes depend on it):

- ``IMPORTANCE``: the mean of ``x_j^2`` per input channel, padded tokens left out: the diagonal of ``X^T X / n``,
  what llama.cpp's importance matrix holds (tools/imatrix/imatrix.cpp, ``collect_imatrix``). Each forward call's
  sums are float32 and are added up in float64 (``square_sums``); returned as float32.
- ``ABS_MEAN``: the mean of ``|x_j|`` per input channel, summed in float64 (AWQ's ``a``); padding counted.
- ``HESSIAN``: ``H = 2/n sum x^T x`` (GPTQ's, arXiv 2210.17323), each call's product in float64, summed in float64;
  padding counted, as the GPTQ reference code counts every token it is fed.
- ``HESSIAN32``: the same with each call's product in float32 (several times faster, and what AWQ's ratio search
  has always used), summed in float64.
- ``OUTLIERS``: per input channel, the tokens whose ``|x_j|`` reaches a threshold and the largest ``|x_j|``, padding
  left out (LLM.int8()'s outlier features, ``lowbit.eval.outliers``); an ``Outliers`` per layer.

A NaN or Inf activation is an InputError naming the layer; so is a layer that received no input.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import InputError

IMPORTANCE = "importance"
ABS_MEAN = "abs_mean"
HESSIAN = "hessian"
HESSIAN32 = "hessian32"
OUTLIERS = "outliers"
KINDS = (IMPORTANCE, ABS_MEAN, HESSIAN, HESSIAN32, OUTLIERS)
_PRODUCT = {HESSIAN: torch.float64, HESSIAN32: torch.float32}


@dataclass
class Outliers:
    """``OUTLIERS`` of one layer over every batch."""

    counts: torch.Tensor = field(repr=False)  # (in_features,) int64: the tokens whose |x_j| >= the threshold
    peak: torch.Tensor = field(repr=False)  # (in_features,) float32: the largest |x_j|
    positions: int  # the tokens read
    shares_input_with: str | None  # the layer before it that read the same input tensor (k_proj: q_proj)


class Statistics:
    """Running sums of ``wants`` for each of ``layers`` (name -> module); ``hooked()`` collects while it is open.
    ``threshold``: the magnitude ``OUTLIERS`` counts from (it alone takes one).

    ``mask`` (the current batch's ``attention_mask`` as bool, or None) and ``batch`` (its index, of ``batches``)
    are set by whoever runs the batches: ``IMPORTANCE`` leaves padded tokens out with the mask, and an error
    names the batch.
    """

    def __init__(self, layers: Mapping[str, nn.Module], wants: Iterable[str], batches: int = 0, *,
                 threshold: float | None = None):
        self.layers, self.wants = dict(layers), tuple(dict.fromkeys(wants))
        unknown = [w for w in self.wants if w not in KINDS]
        if unknown:
            raise InputError(f"unknown statistic {unknown[0]!r}: one of {KINDS}")
        if (OUTLIERS in self.wants) != (threshold is not None):
            raise InputError(f"a threshold goes with the statistic {OUTLIERS!r} and only with it")
        self.sums: dict[str, dict[str, torch.Tensor | None]] = {w: dict.fromkeys(self.layers) for w in self.wants}
        self.counts: dict[str, dict[str, int]] = {w: dict.fromkeys(self.layers, 0) for w in self.wants}
        self.mask: torch.Tensor | None = None
        self.batch, self.batches = 0, batches
        self._input = self._squares = None  # the last input whose squares were summed (q/k/v read one tensor)
        self.threshold = threshold
        self._read = self._reader = self._found = None  # OUTLIERS': the last input counted, its first reader, counts
        self._peaks: dict[str, torch.Tensor] = {}  # OUTLIERS' largest |x_j| per layer
        self._shared: dict[str, str] = {}  # OUTLIERS': layer -> the one before it that read its input tensor

    @contextmanager
    def hooked(self):
        """The layers' pre-hooks in place while the block is open; always removed again."""
        handles = []
        try:
            if self.wants:
                for name, module in self.layers.items():  # one by one: a failure halfway still removes the first
                    handles.append(module.register_forward_pre_hook(self._hook_for(name), with_kwargs=True))
            yield self
        finally:
            for handle in handles:
                handle.remove()
            self._input = self._squares = None
            self._read = self._reader = self._found = None

    def _hook_for(self, name: str):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            for want in self.wants:
                self._add(want, name, x)
        return hook

    def _add(self, want: str, name: str, x: torch.Tensor) -> None:
        if want == IMPORTANCE:
            # q/k/v (and gate/up) projections read one tensor: its sums are computed once. Holding that tensor
            # until the next hook keeps its id from being reused by another.
            if x is not self._input:
                self._input, self._squares = x, square_sums(x.detach(), self.mask)
            s, n = self._squares
            if not torch.isfinite(s).all():  # squares are >= 0: a NaN sum means a NaN input, an Inf sum an Inf
                what = "NaN" if torch.isnan(s).any() else "Inf"
                bad = int((torch.isnan(s) if what == "NaN" else torch.isinf(s)).sum())
                raise InputError(f"calibration activations of {name} hold {what}: in {bad} of its {s.numel()} "
                                 f"input channels (calibration batch {self.batch + 1} of {self.batches}); "
                                 "the model does not compute finite values on this text")
            sums = self.sums[want]
            sums[name] = s if sums[name] is None else sums[name] + s
        elif want == ABS_MEAN:
            x = x.detach().reshape(-1, x.shape[-1])
            n, s = x.shape[0], x.abs().sum(0, dtype=torch.float64)
            self._accumulate(want, name, s)
        elif want == OUTLIERS:
            n = self._outlier_counts(name, x)
        else:
            x = x.detach().reshape(-1, x.shape[-1]).to(_PRODUCT[want])
            if not torch.isfinite(x).all():
                raise InputError(f"calibration activations of {name} hold NaN or Inf: GPTQ cannot use them")
            n = x.shape[0]
            self._accumulate(want, name, (x.T @ x).to(torch.float64))
        self.counts[want][name] += n

    def _outlier_counts(self, name: str, x: torch.Tensor) -> int:
        """``name``'s input ``x`` added to its ``OUTLIERS``; the tokens it holds."""
        if x is not self._read:  # q/k/v read one tensor: counted once, for each of them (held as IMPORTANCE holds it)
            rows = token_rows(x.detach(), self.mask).float().abs()
            if not torch.isfinite(rows).all():
                raise InputError(f"the input of {name} holds NaN or Inf (batch {self.batch + 1} of {self.batches}): "
                                 "the model does not compute finite values on this text")
            self._read, self._reader = x, name
            self._found = (rows >= self.threshold).sum(0), rows.amax(0), rows.shape[0]
        elif self.batch == 0 and self.counts[OUTLIERS][name] == 0:
            self._shared[name] = self._reader
        counts, peak, n = self._found
        sums = self.sums[OUTLIERS]  # new tensors, never added in place: the readers of one input share its counts
        sums[name] = counts if sums[name] is None else sums[name] + counts
        self._peaks[name] = peak if name not in self._peaks else torch.maximum(self._peaks[name], peak)
        return n

    def _accumulate(self, want: str, name: str, s: torch.Tensor) -> None:
        sums = self.sums[want]
        if sums[name] is None:  # 0 + s: the float64 sum starts from zeros, as it always did
            sums[name] = torch.zeros_like(s)
        sums[name] += s

    def result(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{statistic: {layer: tensor}}`` over everything run while hooked (an ``Outliers`` for ``OUTLIERS``)."""
        return {want: getattr(self, f"_{want}")() for want in self.wants}

    def _idle(self, want: str) -> list[str]:
        return [name for name, n in self.counts[want].items() if n == 0]

    def _importance(self) -> dict[str, torch.Tensor]:
        sums, counts = self.sums[IMPORTANCE], self.counts[IMPORTANCE]
        idle = self._idle(IMPORTANCE)
        if idle:
            raise InputError(f"nn.Linear {idle[0]} received no input during calibration ({len(idle)} such layers): "
                             "the forward pass never calls it; leave it out of layers=")
        means = {name: (sums[name] / counts[name]).float() for name in self.layers}
        big = next((name for name, m in means.items() if not torch.isfinite(m).all()), None)
        if big is not None:
            peak = (sums[big] / counts[big]).max().item()
            raise InputError(f"the mean square of {big}'s calibration activations reaches {peak:.3g}, beyond "
                             "float32 (3.4e38): the model's activations are out of range on this text")
        return means

    def _abs_mean(self) -> dict[str, torch.Tensor]:
        self._refuse_idle(ABS_MEAN)
        return {n: (self.sums[ABS_MEAN][n] / self.counts[ABS_MEAN][n]).float() for n in self.layers}

    def _hessian(self, want: str = HESSIAN) -> dict[str, torch.Tensor]:
        self._refuse_idle(want)
        sums = self.sums[want]  # 2 s / n made in the sums' own memory (a 14336-wide one is 1.6 GB), the same floats;
        with torch.inference_mode():  # the hooks made them in inference mode
            return {n: sums.pop(n).mul_(2).div_(self.counts[want][n]) for n in self.layers}

    def _hessian32(self) -> dict[str, torch.Tensor]:
        return self._hessian(HESSIAN32)

    def _outliers(self) -> dict[str, Outliers]:
        idle = self._idle(OUTLIERS)
        if idle:
            raise InputError(f"nn.Linear {idle[0]} received no input ({len(idle)} such layers): the forward pass "
                             "never calls it")
        return {n: Outliers(self.sums[OUTLIERS][n], self._peaks[n], self.counts[OUTLIERS][n], self._shared.get(n))
                for n in self.layers}

    def _refuse_idle(self, want: str) -> None:
        idle = self._idle(want)
        if idle:
            what = "AWQ has no mean |x|" if want == ABS_MEAN else "GPTQ has no Hessian"
            raise InputError(f"nn.Linear {idle[0]} received no input during calibration: {what} for it")


def token_rows(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A layer input as ``(tokens, features)``, the padded tokens (``mask`` False) left out. Only an input
    shaped ``(B, T, features)`` like the mask is masked; others (BERT's pooler) keep every row."""
    if mask is not None and x.dim() == mask.dim() + 1 and x.shape[:-1] == mask.shape:
        x = x[mask]
    return x.reshape(-1, x.shape[-1])


def square_sums(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
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
