"""Error-compensating codebooks (``+cb``): a learned codebook refit to the layer's output error after GPTQ.

A learned format (``lloyd4``, ``qq3``, ...; ``lowbit.formats.learned``) stores one codebook per tensor, fitted to
the block-normalised weights. After GPTQ has chosen every code, the codebook that minimises the layer's output
error on the calibration inputs, ``tr((W - W_q) H (W - W_q)^T)`` with ``H = 2/n X^T X``, is no longer that fit:
GPTQ moved weights to compensate each other's rounding. The decoded weight is linear in the codebook,
``W_q = sum_k c_k P_k`` with ``P_k`` the per-block scale where an element holds code ``k`` and 0 elsewhere, so the
best codebook for fixed codes is the solution of a ``2^bits``-square linear system,
``sum_l tr(P_k H P_l^T) c_l = tr(W H P_k^T)``. GPTVQ (van Baalen et al., arXiv 2402.15319, section 3.3
"codebook update") makes the same update by gradient descent; here it is solved exactly. GPTQ then runs again
with the refit codebook and the codebook is refit once more (``ROUNDS``), since new codes want a new codebook;
GPTQ is greedy, so a later round can come out worse, and the round with the lowest output error is kept.
The codebook stays the format's ``tensor_codebook`` part: same layout, same bytes, any lowbit reader decodes it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from ..errors import InputError
from ..tensor import QuantizedTensor

PART = "tensor_codebook"
# GPTQ + refit rounds. Measured on SmolLM2's block 3 (lloyd4/32+dq+gptq, 8 calibration windows), output error
# relative to GPTQ alone after 1 / 2 / 3 rounds: q_proj 0.958 / 0.920 / 0.906, v_proj 0.986 / 0.968 / 0.945,
# mlp layers 0.996 / 0.993 / 0.990. The second round still pays; the third gains less than it costs in GPTQ time.
ROUNDS = 2
RIDGE = 1e-9  # x the system's mean diagonal: a level no element holds keeps its old value instead of a 0/0


def refit_codebook(weight: torch.Tensor, hessian: torch.Tensor, qweight: QuantizedTensor) -> QuantizedTensor:
    """``qweight`` (codes and scales as they are) with the codebook that minimises ``tr(dW H dW^T)``."""
    if PART not in qweight.parts:
        raise InputError(f"{qweight.format.name} stores no codebook of its own to refit; +cb takes a learned "
                         "codebook format: lloyd2..lloyd8 or qq2..qq8")
    book = qweight.parts[PART]
    levels = book.numel()
    W = weight.detach().to(torch.float64)
    H = hessian.detach().to(torch.float64)
    A = torch.zeros(levels, levels, dtype=torch.float64)
    b = torch.zeros(levels, dtype=torch.float64)
    WH = W @ H
    # P_k: the weight decoded with the one-hot codebook e_k (decode is linear in the codebook)
    basis = [_with_codebook(qweight, torch.eye(levels, dtype=book.dtype)[k]).dequantize().to(torch.float64)
             for k in range(levels)]
    for k, Pk in enumerate(basis):
        PkH = Pk @ H
        b[k] = (WH * Pk).sum()
        for m in range(k, levels):
            A[k, m] = A[m, k] = (PkH * basis[m]).sum()
    ridge = RIDGE * float(A.diagonal().mean()) if float(A.diagonal().mean()) > 0 else 1.0
    eye = torch.eye(levels, dtype=torch.float64)
    solution = torch.linalg.solve(A + ridge * eye, b + ridge * book.to(torch.float64))
    return _with_codebook(qweight, solution.to(book.dtype).contiguous())


def refit_rounds(weight: torch.Tensor, hessian: torch.Tensor, first, gptq: Callable[[dict], object]):
    """``first`` (a ``GPTQResult``) after ``ROUNDS`` of codebook refit and GPTQ with the refit codebook
    (``gptq(tensor_parts)``), ending on a refit: the result of lowest ``tr(dW H dW^T)``."""
    best, best_error, result = None, float("inf"), first
    for round_ in range(ROUNDS):
        result = dataclasses.replace(result, qweight=refit_codebook(weight, hessian, result.qweight))
        error = output_error(weight, hessian, result.qweight)
        if error < best_error:
            best, best_error = result, error
        if round_ + 1 < ROUNDS:
            result = gptq({PART: result.qweight.parts[PART]})
    return best


def output_error(weight: torch.Tensor, hessian: torch.Tensor, qweight: QuantizedTensor) -> float:
    """``tr(dW H dW^T)``, ``dW = W - W_q``: the layer's summed squared output error, up to H's factor."""
    delta = qweight.dequantize().to(torch.float64) - weight.detach().to(torch.float64)
    return float(((delta @ hessian.to(torch.float64)) * delta).sum())


def _with_codebook(qweight: QuantizedTensor, book: torch.Tensor) -> QuantizedTensor:
    return dataclasses.replace(qweight, parts={**qweight.parts, PART: book})
