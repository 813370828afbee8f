"""Error of one quantized tensor against its original, without running a model.

``tensor_errors(x, y)`` compares an original tensor ``x`` with its quantized-then-dequantized
``y``: MSE, SQNR in dB, largest absolute error, relative Frobenius error, and optionally a
weighted MSE/SQNR. With weights = per-input-channel mean squared activations E[a_j²], Σw·(x−y)²
is the diagonal approximation of a linear layer's output error E‖(W−Ŵ)a‖²: the diagonal of the
layer Hessian H = 2XXᵀ of GPTQ's objective ‖WX − ŴX‖² (Frantar et al. 2022, arXiv:2210.17323 §3).

``gaussian_sqnr_bound(R)`` is the best SQNR any quantizer can reach on an i.i.d. Gaussian
source at R bits per sample: the distortion-rate function D(R) = σ²·2^(−2R) (Cover & Thomas,
"Elements of Information Theory", 2nd ed., §10.3, Theorem 10.3.2), so SQNR = σ²/D = 2^(2R),
10·log10(2^(2R)) ≈ 6.02·R dB. Real LLM weights are not Gaussian (heavier tails), so this is
a yardstick for comparing formats, not a bound on them.

Sums run in float64 whatever the input dtype: a float16 sum of squares overflows past 65504.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch

from ..errors import InputError

# 10·log10(2²) dB per bit: 20·log10(2) = 6.0206 (Cover & Thomas §10.3, D(R) = σ²·2^(−2R))
DB_PER_BIT = 20 * math.log10(2)


@dataclass(frozen=True)
class TensorErrors:
    """Error of ``y`` against ``x``. SQNR conventions: ``y == x`` exactly gives ``inf`` (no
    noise, even when ``x`` is all zero); ``x`` all zero with ``y`` not gives ``-inf`` (no signal);
    ``rel_frobenius`` likewise 0.0 and ``inf``. The weighted fields are None unless weights were given."""

    numel: int
    mse: float
    sqnr_db: float
    max_abs: float
    rel_frobenius: float
    weighted_mse: float | None = None
    weighted_sqnr_db: float | None = None

    def to_dict(self) -> dict:
        """Plain floats (``inf`` stays ``inf``; ``lowbit.files.atomic.write_json`` writes it as null)."""
        return asdict(self)


def tensor_errors(x: torch.Tensor, y: torch.Tensor, *, weights: torch.Tensor | None = None) -> TensorErrors:
    """Errors of ``y`` (dequantized) against ``x`` (original): same shape, any float dtypes.

    ``weights``: nonnegative, broadcastable to ``x`` (e.g. shape ``(in_features,)`` for a weight
    ``(out_features, in_features)``), not all zero. ``weighted_mse`` is the weighted mean
    Σw·(x−y)² / Σw (uniform weights give ``mse``); ``weighted_sqnr_db`` is 10·log10(Σw·x² / Σw·(x−y)²).
    """
    _check_pair(x, y)
    xd = _f64(x)
    diff = _f64(y).to(xd.device) - xd  # y − x: no measure here depends on the sign
    # dot products: one pass each and no squared temporaries (this runs over every layer of a model)
    flat_d, flat_x = diff.reshape(-1), xd.reshape(-1)
    noise, signal = float(torch.dot(flat_d, flat_d)), float(torch.dot(flat_x, flat_x))
    result = dict(
        numel=x.numel(),
        mse=noise / x.numel(),
        sqnr_db=_sqnr_db(signal, noise),
        max_abs=float(torch.linalg.vector_norm(flat_d, ord=math.inf)),
        rel_frobenius=_ratio(math.sqrt(noise), math.sqrt(signal)),
    )
    if weights is not None:
        w = _check_weights(weights, x).to(xd.device)
        w_total = float(w.expand_as(xd).sum())
        w_noise, w_signal = float((w * diff.square()).sum()), float((w * xd.square()).sum())
        result.update(weighted_mse=w_noise / w_total, weighted_sqnr_db=_sqnr_db(w_signal, w_noise))
    return TensorErrors(**result)


def sqnr_db(x: torch.Tensor, y: torch.Tensor, rows: int = 1024) -> float:
    """``tensor_errors(x, y).sqnr_db``, summed ``rows`` rows at a time: a float64 copy of a whole 128k x 4k
    output head would take 4 GB (``lowbit compare`` measures every layer of every format so)."""
    _check_pair(x, y)
    x2, y2 = (t.detach().flatten(1) if t.dim() > 1 else t.detach()[None] for t in (x, y))  # (rows, columns)
    signal = noise = 0.0
    for start in range(0, x2.shape[0], rows):
        xd = _f64(x2[start:start + rows]).reshape(-1)
        diff = _f64(y2[start:start + rows]).to(xd.device).reshape(-1) - xd
        signal += float(torch.dot(xd, xd))
        noise += float(torch.dot(diff, diff))
    return _sqnr_db(signal, noise)


def gaussian_sqnr_bound(bits_per_weight: float) -> float:
    """Highest SQNR (dB) any quantizer reaches on i.i.d. Gaussian data at this rate: 6.02·R dB
    (Cover & Thomas §10.3: D(R) = σ²·2^(−2R)). 4 bits -> 24.08 dB."""
    if isinstance(bits_per_weight, bool) or not isinstance(bits_per_weight, int | float) \
            or not math.isfinite(bits_per_weight) or bits_per_weight < 0:
        raise InputError(f"bits_per_weight must be a finite number >= 0, got {bits_per_weight!r}")
    return DB_PER_BIT * bits_per_weight


def _sqnr_db(signal: float, noise: float) -> float:
    if noise == 0.0:
        return math.inf  # exact reconstruction, of any signal (zero included)
    if signal == 0.0:
        return -math.inf  # noise and no signal
    return 10 * math.log10(signal / noise)


def _ratio(num: float, den: float) -> float:
    if num == 0.0:
        return 0.0
    return num / den if den else math.inf


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float64)


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    for name, t in (("x", x), ("y", y)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {t.dtype}")
    if x.shape != y.shape:
        raise InputError(f"x and y differ in shape: {tuple(x.shape)} vs {tuple(y.shape)}; pass the dequantized "
                         "tensor in the original's shape")
    if x.numel() == 0:
        raise InputError("x is empty: an error needs at least one element")


def _check_weights(weights: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    w = _f64(torch.as_tensor(weights))
    try:
        torch.broadcast_shapes(w.shape, x.shape)
    except RuntimeError:
        raise InputError(f"weights of shape {tuple(w.shape)} do not broadcast to x's {tuple(x.shape)}; "
                         "e.g. give one weight per input channel, shape (x.shape[-1],)") from None
    if torch.broadcast_shapes(w.shape, x.shape) != x.shape:
        raise InputError(f"weights of shape {tuple(w.shape)} would enlarge x's {tuple(x.shape)}; "
                         "they must broadcast to x's shape")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise InputError("weights must be finite and nonnegative")
    if not bool((w > 0).any()):
        raise InputError("weights are all zero: nothing would be measured")
    return w
