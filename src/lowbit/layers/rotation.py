"""Incoherence processing: a randomized Hadamard rotation of a layer's input dimension (``+had`` labels).

``y = W x = (W Q)(Q^T x)`` for any orthogonal ``Q``. With ``Q = D H / sqrt(b)`` (``D`` a diagonal of random
signs, ``H`` the Sylvester-Hadamard matrix of size ``b``, block-diagonal over the input dimension) the rotated
weight ``W Q`` has its outliers spread over whole blocks, so a low-bit grid fits it better, and ``Q^T x`` costs
a fast Walsh-Hadamard transform of the activations at run time: ``n log2(b)`` additions per token (QuIP#, arXiv
2402.04396, section 3; HIGGS, arXiv 2411.17525, section 3, rotates in groups the same way). ``b`` is the largest
power of two dividing the input dimension (64 for SmolLM2's 576, 512 for its 1536).

Both sides use one transform, ``rotate(v) = FWHT(signs * v) / sqrt(b)`` on the last dimension: ``Q^T x`` is
``rotate(x)`` and each row of ``W Q`` is ``rotate(w)``. Its inverse is ``unrotate(v) = signs * FWHT(v) /
sqrt(b)``. The layer's Hessian ``X^T X`` becomes ``Q^T H Q``, so GPTQ and the activation-weighted searches see the
rotated inputs' statistics. The signs are stored with the layer (one int8 per input channel, counted in its bytes).
"""

from __future__ import annotations

import zlib

import torch

from ..errors import InputError


def hadamard_block(n: int) -> int:
    """The largest power of two dividing ``n``: the size of the diagonal Hadamard blocks."""
    block = n & -n
    if block < 2:
        raise InputError(f"a Hadamard rotation needs an even input dimension, got {n}")
    return block


def layer_signs(name: str, n: int) -> torch.Tensor:
    """``(n,)`` int8 random signs, drawn from a seed derived from the layer's name (reproducible per layer)."""
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return (torch.randint(0, 2, (n,), generator=g, dtype=torch.int8) * 2 - 1).to(torch.int8)


def fwht(x: torch.Tensor, block: int) -> torch.Tensor:
    """Walsh-Hadamard transform of each ``block`` of the last dimension, divided by sqrt(block) (orthonormal)."""
    n = x.shape[-1]
    if n % block or block & (block - 1):
        raise InputError(f"the last dimension {n} is not a whole number of Hadamard blocks of {block}")
    shape = x.shape
    y = x.reshape(-1, n // block, block)
    h = 1
    while h < block:
        y = y.view(y.shape[0], -1, 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    return y.reshape(shape) * (block ** -0.5)


def rotate(x: torch.Tensor, signs: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """``Q^T x`` for activations (last dimension = input channels), or a weight row's ``W Q``. ``block``: the
    Hadamard block, by default ``hadamard_block(len(signs))``."""
    return fwht(x * signs.to(x.dtype), block or hadamard_block(signs.numel()))


def unrotate(x: torch.Tensor, signs: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """The inverse of ``rotate``: a rotated weight's rows back in the original input basis."""
    return fwht(x, block or hadamard_block(signs.numel())) * signs.to(x.dtype)


def rotate_hessian(hessian: torch.Tensor, signs: torch.Tensor, block: int | None = None, *,
                   overwrite: bool = False) -> torch.Tensor:
    """``Q^T H Q`` for a symmetric ``H``: ``rotate`` on its rows, then on the rows of the transpose. Rows are
    rotated in chunks in place (the same floats: the transform works on each row alone), so that at most three of
    ``H``'s size are alive, ``H`` included, not six (a 14336-wide fp64 Hessian is 1.6 GB); two with
    ``overwrite`` (``hessian`` is then left destroyed)."""
    half = _rotate_rows(hessian if overwrite else hessian.clone(), signs, block)
    half_t = half.T.contiguous()
    del half
    return _rotate_rows(half_t, signs, block)


_ROWS = 512  # rows rotated at a time: 512 x 14336 fp64 is 59 MB


def _rotate_rows(x: torch.Tensor, signs: torch.Tensor, block: int | None) -> torch.Tensor:
    """``x`` with each row rotated, in place."""
    for i in range(0, x.shape[0], _ROWS):
        x[i:i + _ROWS] = rotate(x[i:i + _ROWS], signs, block)
    return x
