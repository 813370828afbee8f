"""What the workflow tests share (and the tests of the commands around them): an independent weight SQNR."""

import numpy as np
import torch

import lowbit


def sqnr_db(w: torch.Tensor, fmt: str) -> float:
    """10·log10(Σw² / Σ(w−ŵ)²) in numpy float64, independently of lowbit.eval.tensor."""
    x = w.detach().numpy().astype(np.float64)
    y = lowbit.quantize(w.detach(), fmt).dequantize().numpy().astype(np.float64)
    return float(10 * np.log10((x**2).sum() / ((x - y) ** 2).sum()))
