"""LLM.int8(): int8 weights and activations, with the outlier feature columns in float
(Dettmers et al., arXiv 2208.07339; bitsandbytes ``MatMul8bitLt``; docs/formats.md#llmint8).

A sibling of ``QuantLinear`` chosen by the config: unlike every other format the layer
depends on its input at run time. For an input row x (a token) and threshold t:

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

from ..quantize import quantize
from ..tensor import QuantizedTensor

DEFAULT_THRESHOLD = 6.0  # the paper's outlier magnitude (§3.2) and bitsandbytes' llm_int8_threshold default
QMAX = 127  # narrow int8 range, as the paper's and bitsandbytes' vector-wise quantization
# fp32 sums of int8 products are exact integers while |sum| < 2^24: K <= 2^24 / 127^2 columns at a time
EXACT_COLUMNS = 2**24 // QMAX**2


def check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not threshold >= 0 or threshold == float("inf"):
        raise ValueError(f"the outlier threshold is a finite number >= 0 (0 turns the decomposition off), "
                         f"got {threshold}")
    return threshold


def int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b.T`` of int8 matrices as exact int32. torch._int_mm where the CPU has AVX-512 (VNNI);
    without it torch falls back to scalar code 23x slower than an fp32 matmul here (1536x1536x512:
    603 ms vs 26 ms), so the product is taken in fp32 on column slices whose sums stay exact."""
    if a.is_cuda or torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return torch._int_mm(a, b.t())
    out = torch.zeros(a.shape[0], b.shape[0], dtype=torch.int32)
    for k in range(0, a.shape[1], EXACT_COLUMNS):
        part = a[:, k : k + EXACT_COLUMNS].float() @ b[:, k : k + EXACT_COLUMNS].float().t()
        out += part.to(torch.int32)
    return out


class Int8OutlierLinear(nn.Module):
    """``y = x W^T + b`` with LLM.int8()'s mixed-precision decomposition (module docstring)."""

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None,
                 threshold: float = DEFAULT_THRESHOLD, name: str = ""):
        super().__init__()
        if qweight.format.name != "int8" or qweight.block_size != qweight.shape[1]:
            raise ValueError("Int8OutlierLinear holds an int8 weight with one block per row "
                             f"(block {qweight.shape[1]}), got {qweight.format.name}/{qweight.block_size}")
        self.qweight = qweight
        self.out_features, self.in_features = qweight.shape
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
        self.threshold = check_threshold(threshold)
        self.name = name  # named in run-time errors
        codes = qweight.parts["codes"].reshape(qweight.shape)
        self.register_buffer("_q", (codes.to(torch.int16) - QMAX).to(torch.int8), persistent=False)
        self.register_buffer("_s", qweight.parts["scales"].reshape(-1, 1), persistent=False)
        self.outlier_columns = 0  # columns of the last call that took the float path

    @classmethod
    def from_linear(cls, linear: nn.Linear, threshold: float = DEFAULT_THRESHOLD, name: str = "") -> Int8OutlierLinear:
        w = linear.weight.detach()
        return cls(quantize(w, "int8", block_size=w.shape[1]), linear.bias, threshold, name)

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features:
            raise ValueError(f"{self.name or 'Int8OutlierLinear'}: input of shape {tuple(x.shape)}; expected "
                             f"(tokens, {self.in_features}) or (batch, tokens, {self.in_features})")
        shape = x.shape
        x = x.reshape(-1, self.in_features).float()
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"{self.name or 'Int8OutlierLinear'}: NaN or inf in the input activations")
        big = x.abs() >= self.threshold if self.threshold > 0 else torch.zeros_like(x, dtype=torch.bool)
        outliers = big.any(0)
        cols = outliers.nonzero().flatten()
        # the row absmax leaves out the outlier values themselves, not their whole columns (bitsandbytes'
        # int8_vectorwise_quant); the columns are then zeroed for the integer product
        a = x.masked_fill(big, 0.0).abs().amax(1, keepdim=True)
        scaled = x.masked_fill(outliers, 0.0) * (QMAX / a.clamp(min=torch.finfo(torch.float32).tiny))
        xq = torch.round(scaled).clamp_(-QMAX, QMAX).to(torch.int8)
        y = int8_matmul(xq, self._q).float() * (a / QMAX) * self._s.t()
        if cols.numel():
            y = y + x[:, cols] @ (self._q[:, cols].float() * self._s).t()
        if self.bias is not None:
            y = y + self.bias
        self.outlier_columns = int(cols.numel())
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, threshold={self.threshold}"
