"""What the float format tests share: ml_dtypes' values and casts, and inputs that probe rounding at every tie."""

import math

import numpy as np

from lowbit.formats.exmy import ExMy


def ml_values(dtype, bits: int) -> np.ndarray:
    """float64 value of every code of an ml_dtypes type (sub-byte types sit in the low bits)."""
    return np.arange(2**bits, dtype=np.uint8).view(dtype).astype(np.float64)


def ml_cast(x: np.ndarray, dtype) -> np.ndarray:
    return x.astype(np.float32).astype(dtype).astype(np.float64)


def rounding_probe(fmt: ExMy, n: int = 4000) -> np.ndarray:
    """float32 inputs in [-max, max]: log-uniform magnitudes (subnormals too), every
    midpoint between neighbours (exact ties), and the floats just beside each midpoint."""
    rng = np.random.default_rng(0)
    mags = np.array(sorted({abs(v) for v in fmt.values if math.isfinite(v)}), dtype=np.float32)
    mids = (mags[:-1] + mags[1:]) / 2
    lo = math.log2(mags[1]) - 2
    rand = np.exp2(rng.uniform(lo, math.log2(fmt.max_finite), n)).astype(np.float32)
    beside = np.concatenate([np.nextafter(mids, np.float32(0)), np.nextafter(mids, np.float32(np.inf))])
    x = np.concatenate([rand, mids, beside, mags]).astype(np.float32)
    x = np.clip(x, 0, fmt.max_finite).astype(np.float32)
    return np.concatenate([x, -x])
