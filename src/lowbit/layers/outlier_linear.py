"""LLM.int8(): int8 weights and activations, with the outlier feature columns in float
(Dettmers et al., arXiv 2208.07339; bitsandbytes ``MatMul8bitLt``; docs/formats.md#llmint8).

Chosen by the config (``int8_outlier``, ``lowbit.planning.config``): unlike every other format the layer
depends on its input at run time, so it overrides ``QuantLinear.forward`` and keeps the rest
(stored parts, bytes, device moves, saving). For an input row x (a token) and threshold t:

  outlier columns  every input feature j with |x_j| >= t in any row of this call
  activations      a = max |x_j| over the other columns (bitsandbytes excludes the outliers
                   from the row absmax), xq = round(127 x / a), outlier columns zeroed
  weights          int8, one absmax scale s per output row, stored as lowbit's int8 format
                   with one block per row: w = q s, s = absmax / 127
  output           (xq @ q^T as int32) * (a / 127) * s  +  x[:, out] @ (q[:, out] s)^T  + bias

t = 0 turns the decomposition off (every column through int8).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError
from ..planning.config import DEFAULT_THRESHOLD, check_threshold  # the label's facts, read without torch (re-exported)
from ..quantize import quantize
from ..tensor import QuantizedTensor
from .linear import QuantLinear

QMAX = 127  # narrow int8 range, as the paper's and bitsandbytes' vector-wise quantization
# fp32 sums of int8 products are exact integers while |sum| < 2^24: K <= 2^24 / 127^2 columns at a time
EXACT_COLUMNS = 2**24 // QMAX**2


def native_int_mm(device: torch.device) -> bool:
    """Whether torch._int_mm is a real integer kernel on ``device``: CUDA, or a CPU with AVX-512 (VNNI);
    without it torch falls back to scalar code 23x slower than an fp32 matmul here (1536x1536x512: 603 ms
    vs 26 ms)."""
    cpu_vnni = device.type == "cpu" and torch.backends.cpu.get_cpu_capability().startswith("AVX512")
    return device.type == "cuda" or cpu_vnni


def int_mm_runs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``native_int_mm``, and on CUDA the shapes torch._int_mm takes (rows > 16, widths multiples of 8)."""
    if a.is_cuda:
        return a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0
    return native_int_mm(a.device)


def int8_matmul(a: torch.Tensor, b: torch.Tensor | None, b_float_t: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b.T`` of int8 matrices as exact int32: torch._int_mm where it runs (``int_mm_runs``),
    else fp32 products on column slices whose sums stay exact. ``b_float_t``: ``b.T`` as contiguous
    float32, kept by the caller so the fp32 path neither converts ``b`` on every call nor reads it
    in strided column slices (``b`` may then be None)."""
    if b is not None and int_mm_runs(a, b):
        return torch._int_mm(a, b.t())
    return _sliced_product(a.float(), b, b_float_t)


def _sliced_product(a: torch.Tensor, b: torch.Tensor | None, b_float_t: torch.Tensor | None) -> torch.Tensor:
    """``int8_matmul``'s fp32 path, ``a`` already float32 (integers in [-127, 127])."""
    out = None
    for k in range(0, a.shape[1], EXACT_COLUMNS):
        part = b_float_t[k : k + EXACT_COLUMNS] if b_float_t is not None else b[:, k : k + EXACT_COLUMNS].float().t()
        product = (a[:, k : k + EXACT_COLUMNS] @ part).to(torch.int32)
        out = product if out is None else out.add_(product)
    return out


def integer_product(xr: torch.Tensor, b: torch.Tensor | None, b_float_t: torch.Tensor | None) -> torch.Tensor:
    """``float32(int8_matmul(xr, b))`` for float32 ``xr`` holding integers in [-127, 127]: one fp32 product
    where the row is short enough for its sums to be exact (K <= EXACT_COLUMNS), skipping the int8 and
    int32 round trips, which give the same numbers."""
    if b is not None and int_mm_runs(xr, b):
        return torch._int_mm(xr.to(torch.int8), b.t()).float()
    if xr.shape[1] <= EXACT_COLUMNS:
        return xr @ (b_float_t if b_float_t is not None else b.float().t())
    return _sliced_product(xr, b, b_float_t).float()


class Int8OutlierLinear(QuantLinear):
    """``y = x W^T + b`` with LLM.int8()'s mixed-precision decomposition (module docstring).

    ``materialize()`` keeps the weight's integer codes as float32, transposed to (in, out) so the fp32
    product reads contiguous row slices (``int8_matmul``), where torch._int_mm does not run: the codes are
    then not converted on every call, and the results are the same to the bit. ``columns_seen`` and
    ``float_columns`` count, over the calls since ``reset_counts()``, the input columns each call had and
    those that took the float path; ``outlier_columns`` is the last call's."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None,
                 threshold: float = DEFAULT_THRESHOLD, name: str = ""):
        if qweight.format.name != "int8" or len(qweight.shape) != 2 or qweight.block_size != qweight.shape[1] \
                or qweight.double_quant:
            raise InputError("Int8OutlierLinear holds an int8 weight with one block per row "
                             f"(block {qweight.shape[-1]}), got {qweight.format.name}/{qweight.block_size}"
                             f"{'+dq' if qweight.double_quant else ''} of shape {tuple(qweight.shape)}")
        super().__init__(qweight, bias)
        self.threshold = check_threshold(threshold)
        self.name = name  # named in run-time errors
        self.outlier_columns = 0
        self.reset_counts()

    @classmethod
    def from_linear(cls, linear: nn.Linear, qweight: QuantizedTensor | None = None, *,
                    threshold: float = DEFAULT_THRESHOLD, name: str = "") -> Int8OutlierLinear:
        """The layer for ``linear``; ``qweight``: its weight already quantized (int8, one block per row)."""
        w = linear.weight.detach()
        if qweight is None:
            qweight = quantize(w, "int8", block_size=w.shape[1])
        elif tuple(qweight.shape) != tuple(w.shape):
            raise InputError(f"weight shape {tuple(qweight.shape)} != layer shape {tuple(w.shape)}")
        return cls(qweight, linear.bias, threshold, name)

    def reset_counts(self) -> None:
        self.columns_seen = self.float_columns = 0

    def int8_weight(self) -> torch.Tensor:
        """The codes q as int8 (out, in): stored as q + 127 in uint8, and the uint8 subtraction wraps."""
        return (self.qweight.parts["codes"] - QMAX).view(torch.int8).reshape(self.out_features, self.in_features)

    def row_scales(self) -> torch.Tensor:
        return self.qweight.parts["scales"].reshape(-1, 1)

    def materialize(self) -> Int8OutlierLinear:
        q = self.int8_weight()
        if not native_int_mm(q.device):
            self._dequantized = q.t().float().contiguous()  # (in, out): the integer codes, not q s
        return self

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        kept = self._dequantized
        w = kept.t() * self.row_scales() if kept is not None else self.qweight.dequantize()
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features:
            raise InputError(f"{self.name or 'Int8OutlierLinear'}: input of shape {tuple(x.shape)}; expected "
                             f"(tokens, {self.in_features}) or (batch, tokens, {self.in_features})")
        shape, dtype = x.shape, x.dtype
        x = x.reshape(-1, self.in_features).float()
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{self.name or 'Int8OutlierLinear'}: NaN or inf in the input activations")
        magnitude = x.abs()
        cols = x.new_empty(0, dtype=torch.int64)
        if self.threshold > 0:
            big = magnitude >= self.threshold
            cols = big.any(0).nonzero().flatten()
            # the row absmax leaves out the outlier values themselves, not their whole columns (bitsandbytes'
            # int8_vectorwise_quant); the columns are then zeroed for the integer product
            magnitude.masked_fill_(big, 0.0)
        a = magnitude.amax(1, keepdim=True)
        scaled = x * (QMAX / a.clamp(min=torch.finfo(torch.float32).tiny))
        if cols.numel():
            scaled[:, cols] = 0.0
        xr = torch.round(scaled).clamp_(-QMAX, QMAX)  # integers, kept in float32
        s, kept = self.row_scales().t(), self._dequantized
        q = self.int8_weight() if kept is None else None
        y = integer_product(xr, q, kept) * (a / QMAX) * s
        if cols.numel():
            w_cols = (kept[cols] if kept is not None else q[:, cols].t().float()) * s  # (outlier columns, out)
            y = y + x[:, cols] @ w_cols
        if self.bias is not None:
            y = y + self.bias
        self.outlier_columns = int(cols.numel())
        self.columns_seen += self.in_features
        self.float_columns += self.outlier_columns
        return y.reshape(*shape[:-1], self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, outlier threshold={self.threshold:g}"


def float_path_share(model: nn.Module) -> float | None:
    """Share of the input columns of every ``Int8OutlierLinear`` call since their ``reset_counts()``
    that took the float path; None when the model has no such layer or none ran."""
    layers = [m for m in model.modules() if isinstance(m, Int8OutlierLinear)]
    seen = sum(m.columns_seen for m in layers)
    return sum(m.float_columns for m in layers) / seen if seen else None
