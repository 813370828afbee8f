"""GPTQ: quantize a layer's weight column by column, spreading each column's rounding error over the columns
not yet quantized, weighted by the inverse Hessian of the layer's output error (Frantar et al., "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers", arXiv 2210.17323, Algorithm 1).

For ``y = x @ W.T`` and calibration inputs ``X`` the output error ``||X W.T - X Q.T||^2`` has Hessian
``H = 2 X.T X`` per row of ``W``. The steps, as the paper and its reference code (github.com/IST-DASLab/gptq,
``gptq.py`` ``fasterquant``) take them:

- dead inputs (``H[j, j] = 0``: the column never sees a nonzero input) get ``H[j, j] = 1`` and ``W[:, j] = 0``;
- damping: ``H + damp * I`` with ``damp = 0.01 * mean(diag H)`` (the paper's 1%), multiplied by 10 until the
  Cholesky factorization succeeds (reported in ``GPTQResult.damp``);
- ``U``: the upper Cholesky factor of ``H^-1``; column ``j`` is rounded, its error ``(w - q) / U[j, j]`` is
  subtracted from the later columns times ``U[j, j:]``;
- lazy batches of 128 columns: updates inside a batch are applied column by column, the rest once per batch;
- act-order (``act_order=True``): columns in order of decreasing ``H[j, j]``. The scales are then chosen
  for every block up front from the original weights (the reference code's ``static_groups``), so each block
  still covers ``block`` consecutive input columns of a row and the stored layout is the format's own.
  Without act-order a block's scales are chosen when its first column is reached, from the weights as the
  earlier columns' errors left them (the reference code's ``groupsize``).
- double quantization (``double_quant=True``): the scales are compressed in groups of 256 blocks across rows, so
  they too are chosen up front from the original weights, compressed, and the decompressed scales (what
  ``dequantize`` will multiply by) are the ones GPTQ rounds against.

Blocks are the format's, laid along each row (``in_features`` must be a multiple of the block), scales chosen
by the format's rule or a scale search (``lowbit.pipeline``); with ``@amse`` / ``@ahqq`` each input column's
importance is ``diag(H)``, the calibration mean of ``x_j^2`` up to a constant factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import InputError
from ..formats.registry import get_format, require_grid
from ..formats.spec import no_double_quant_message
from ..pipeline import WEIGHTED, check_search, searched_scales, zero_code
from ..scaling import double_quant as dq
from ..scaling.packing import pack_codes
from ..tensor import QuantizedTensor

DAMP = 0.01  # the paper's damping, 1% of the mean diagonal (arXiv 2210.17323 §4, "Cholesky Reformulation")
LAZY = 128  # columns per lazy batch (arXiv 2210.17323 §4, "Lazy Batch-Updates")
DAMP_TRIES = 8  # damping x10 per failed Cholesky: up to 1e5 x the mean diagonal


@dataclass(frozen=True)
class GPTQResult:
    qweight: QuantizedTensor
    damp: float  # the damping added to H's diagonal (absolute), raised from DAMP x mean(diag H) if it had to be
    damp_raised: bool


# What GPTQ needs of a format (the +gptq method's check refuses a label without it before any model loads).
NEEDS_GRID = "GPTQ needs a format whose elements are levels on a grid, such as int4, int4_asym, nf4 or fp4_e2m1"


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, fmt, *, block_size: int | None = None,
                  search: str | None = None, act_order: bool = False, double_quant: bool = False,
                  percdamp: float = DAMP, lazy: int = LAZY, tensor_parts: dict | None = None,
                  overwrite_hessian: bool = False) -> GPTQResult:
    """``weight`` (out, in), ``hessian`` (in, in) -> the quantized weight (the format's stored layout).
    ``tensor_parts``: the per-tensor parts to round against (a learned codebook: ``lowbit.methods.codebook_refit``);
    by default the format's own, fitted to ``weight``. ``overwrite_hessian``: a float64 ``hessian`` is the work
    space and is left destroyed (SciPy's ``overwrite_a``), so no copy of it is made (1.6 GB at 14336 wide)."""
    spec = get_format(fmt)
    codec = require_grid(spec, NEEDS_GRID)
    block = block_size or spec.default_block_size
    out_f, in_f = weight.shape
    if in_f % block:
        raise InputError(f"GPTQ lays {spec.name}'s blocks of {block} along each row; the rows hold {in_f} weights")
    if hessian.shape != (in_f, in_f):
        raise InputError(f"the Hessian must be ({in_f}, {in_f}) for a weight of {tuple(weight.shape)}, "
                         f"got {tuple(hessian.shape)}")
    if search is not None:
        search = check_search(spec, search)
    if double_quant and not spec.double_quant:
        raise InputError(no_double_quant_message(spec))
    if not torch.isfinite(hessian).all():
        raise InputError("the Hessian holds NaN or Inf: the calibration activations were not finite")

    W = weight.detach().to(torch.float64).clone()
    H = hessian.detach().to(torch.float64, copy=not overwrite_hessian)
    del hessian
    dead = torch.diagonal(H) == 0
    if dead.any():
        H[dead, dead] = 1.0
    W[:, dead] = 0.0
    importance = torch.diagonal(H).to(torch.float32)
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else None
    if perm is not None:
        H = H[perm]
        H = H[:, perm]
    U, damp, raised = _inverse_cholesky(H, percdamp)
    del H

    if tensor_parts is None:
        tensor_parts = codec.tensor_parts(spec, W.reshape(-1).to(torch.float32), block)
    groups = in_f // block

    def choose(cols: torch.Tensor, g: int) -> dict[str, torch.Tensor]:
        """Scale parts for block ``g`` of every row, from its current (out, block) values."""
        blocks = cols.to(torch.float32).contiguous()
        if search is None:
            return codec.choose_scales(spec, blocks, tensor_parts)
        w = importance[g * block:(g + 1) * block].expand(out_f, block).contiguous() if search in WEIGHTED else None
        return searched_scales(codec, spec, blocks, tensor_parts, search, w, False)

    scales: list[dict | None] = [None] * groups
    compressed = {}
    if perm is not None or double_quant:  # static groups: every block's scales from the original weights
        scales = [choose(W[:, g * block:(g + 1) * block], g) for g in range(groups)]
        if double_quant:  # blocks in stored order: row by row, so the 256-scale groups span rows
            compressed = dq.compress(torch.stack([s["scales"] for s in scales], dim=1).reshape(-1))
            kept = dq.decompress(compressed).view(out_f, groups)
            scales = [{**s, "scales": kept[:, g].contiguous()} for g, s in enumerate(scales)]
    if perm is not None:
        W = W[:, perm]
    columns = perm.tolist() if perm is not None else list(range(in_f))
    codes = torch.empty(out_f, in_f, dtype=torch.uint8)
    step = max(block, lazy // block * block)  # a multiple of the block: a block never spans two batches
    for i1 in range(0, in_f, step):
        i2 = min(i1 + step, in_f)
        W1, Err1, U1 = W[:, i1:i2].clone(), torch.zeros(out_f, i2 - i1, dtype=torch.float64), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            j = columns[i1 + i]  # the weight's own column
            g = j // block
            if scales[g] is None:  # first column of block g (in order): W1 holds it and the rest of the block
                scales[g] = choose(W1[:, i:i + block], g)
            parts = {**tensor_parts, **scales[g]}
            w = W1[:, i]
            c = codec.encode(spec, w.to(torch.float32)[:, None].contiguous(), parts)
            q = codec.decode(spec, c, parts)[:, 0].to(torch.float64)
            codes[:, j] = c[:, 0]
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]

    stacked = {k: torch.stack([s[k] for s in scales], dim=1).reshape(out_f * groups, *scales[0][k].shape[1:])
               for k in scales[0]}
    if compressed:  # stored as lowbit.quantize stores a +dq tensor: its scales replaced by their codes
        del stacked["scales"]
        stacked.update(compressed)
    parts = {**tensor_parts, "codes": pack_codes(codes.reshape(-1), spec.bits, pad_code=zero_code(spec)), **stacked}
    qweight = QuantizedTensor(format=spec, shape=weight.shape, dtype=weight.dtype, block_size=block, parts=parts,
                              double_quant=double_quant)
    return GPTQResult(qweight, damp, raised)


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, float, bool]:
    """Upper Cholesky factor of ``(H + damp I)^-1``, damping raised x10 until ``H + damp I`` factors. ``H`` is
    damped in place (its diagonal put back before each try) and the factor inverted and factored again in place:
    two matrices of ``H``'s size alive, ``H`` included (3.3 GB for a 14336-wide float64 one)."""
    base = percdamp * float(torch.diagonal(H).mean())
    diagonal = torch.diagonal(H).clone()
    for attempt in range(DAMP_TRIES):
        damp = base * 10.0**attempt
        H.diagonal().copy_(diagonal).add_(damp)
        L, info = torch.linalg.cholesky_ex(H)
        if int(info) == 0:
            # L is column-major, LAPACK's layout: potri and potrf work in its storage, as LAPACK does
            torch.cholesky_inverse(L, out=L)
            U, info = torch.linalg.cholesky_ex(L, upper=True, out=(L, info))
            if int(info) == 0:
                return U, damp, attempt > 0
        del L
    raise InputError(f"the Hessian is not positive definite even damped by {damp:.3g} "
                     f"({10.0 ** (DAMP_TRIES - 1) * percdamp:.0e} of its mean diagonal)")
