"""Scale search: per-block scale (and zero point) minimising the (importance-)weighted squared error.

Pure tensor functions over blocks ``(n_blocks, block)`` float32, vectorised over blocks. Format-agnostic:
``mse_search`` never sees a format, the caller passes ``propose`` / ``roundtrip`` callables; ``hqq_search``
works on the zero-point grid ``w ~ (q - z) * s`` of the ``int*_asym`` formats (``docs/formats.md``) with a float
zero, written out here rather than imported from lowbit.formats.

``weights`` (optional, nonnegative, same shape as ``blocks``) is the importance of each element, as llama.cpp's
importance matrix (``quant_weights`` in ggml/src/ggml-quants.c): a block's error is
``sum(weights * (decoded - blocks) ** 2)``. The searches named ``amse`` / ``ahqq`` are ``mse`` / ``hqq`` with weights.

Sources: llama.cpp ggml/src/ggml-quants.c (``make_qx_quants``, ``quantize_row_iq4_nl_impl``); Badri & Shaji 2023,
"Half-Quadratic Quantization of Large Machine Learning Models" (https://mobiusml.github.io/hqq_blog/) and the
``hqq`` package 0.2.8 (hqq/core/optimize.py ``optimize_weights_proximal_legacy``, ``shrink_lp_op``;
hqq/core/quantize.py ``Quantizer.quantize``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .errors import InputError

Parts = dict[str, torch.Tensor]

SEARCHES = ("mse", "amse", "hqq", "ahqq")
WEIGHTED = frozenset({"amse", "ahqq"})  # the searches that weigh the error by calibration activations
HQQ = frozenset({"hqq", "ahqq"})  # the searches that choose a (float) zero point

# Coarse-to-fine: COARSE_RATIOS for every block, then FINE_STEPS around each block's best, then
# least-squares refits of the winner: 15 + 4 + 2 roundtrips instead of a 53-ratio scan with a refit per
# ratio (5x less work; on randn 4096x64 the MSE it reaches is within 0.1% of the full scan's).
# Measured on randn 4096x64 with ratios <= 1: 4-bit blocks pick 0.78-1.0 (median 0.91), 3-bit 0.52-1.0
# (median 0.76), symmetric int2 (levels -1, 0, 1) 0.26-0.7 (median 0.475), hence the reach down to 0.3.
# Ratios above 1 clip nothing but shift where the levels fall: they took symmetric int8's MSE from
# 3.53e-5 to 3.22e-5. A fine step of 1.25% moves a 4-bit block's top level (7 steps) by 0.09 of a step.
# llama.cpp's make_qx_quants tries 19 ratios nmax / (nmax + 0.1 * is), is in [-9, 9], above and below 1.
COARSE_RATIOS = (1.1, 1.05, 1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6, 0.55, 0.5, 0.4, 0.3)
FINE_STEPS = (-0.025, -0.0125, 0.0125, 0.025)
REFITS = 2
DEFAULT_RATIOS = COARSE_RATIOS  # the grid mse_search scans before refining (kept for callers)

_TINY = torch.finfo(torch.float32).tiny  # divisor for all-zero blocks, as AsymmetricInt (0 / tiny = 0, no NaN)


def check_search_name(name: str) -> str:
    """``name`` if it is a known search; else a one-line ValueError listing the known ones."""
    if name not in SEARCHES:
        raise InputError(f"unknown scale search {name!r}; known: {', '.join(SEARCHES)}")
    return name


def _check_blocks(blocks: torch.Tensor, weights: torch.Tensor | None) -> None:
    if blocks.dim() != 2 or blocks.dtype != torch.float32:
        shape = tuple(blocks.shape)
        raise InputError(f"blocks must be a 2-D float32 tensor (n_blocks, block), got {blocks.dtype} {shape}")
    if weights is not None and (weights.shape != blocks.shape or weights.dtype != torch.float32):
        raise InputError(
            f"weights must be float32 of the blocks' shape {tuple(blocks.shape)}, "
            f"got {weights.dtype} {tuple(weights.shape)}"
        )


def _error(decoded: torch.Tensor, blocks: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """Per-block (weighted) squared error; NaN (a candidate that broke) counts as +inf so it never wins."""
    sq = (decoded - blocks).square_()
    if weights is not None:
        sq.mul_(weights)
    return sq.sum(dim=1).nan_to_num_(nan=float("inf"))


def _select(better: torch.Tensor, new: Parts, best: Parts) -> Parts:
    """Per block, ``new``'s parts where ``better`` else ``best``'s (dtypes kept)."""
    return {k: torch.where(better.view(-1, *([1] * (v.dim() - 1))), new[k], best[k]) for k, v in best.items()}


def _refit_scale(blocks, weights, decoded, scales):
    """Weighted least-squares scale for the levels ``decoded / scales`` chose: s* = sum(w x l) / sum(w l^2)."""
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    levels = decoded / safe[:, None]
    wl = levels if weights is None else weights * levels
    num, den = (wl * blocks).sum(dim=1), (wl * levels).sum(dim=1)
    # No levels (an all-zero block, or every weight 0): nothing to fit, keep the scale.
    return torch.where(den > 0, num / torch.where(den > 0, den, torch.ones_like(den)), scales)


def mse_search(
    blocks: torch.Tensor,
    *,
    propose: Callable[[torch.Tensor], Parts],
    roundtrip: Callable[[Parts], torch.Tensor],
    weights: torch.Tensor | None = None,
    ratios: Sequence[float] | None = None,
    refit: bool = False,
    start: torch.Tensor | None = None,
) -> Parts:
    """Per block, the scale parts of the clipping ratio whose roundtrip has the least (weighted) squared
    error: the ``ratios`` grid (default ``COARSE_RATIOS``), then (default grid only) ``FINE_STEPS`` around
    each block's best ratio, then ``REFITS`` least-squares refits of the winner (``refit=True``).
    ``start``: a ``(n_blocks,)`` ratio already searched (by a fast kernel, ``lowbit.dispatch`` op "search"):
    only ratio 1.0, ``start`` and the refits are then tried.

    ``propose(ratio)`` gets a ``(n_blocks,)`` float32 ratio (1.0 = the format's absmax / min-max rule) and returns
    the format's per-block scale parts (dim 0 = n_blocks, any dtype); ``roundtrip(parts)`` returns the decoded
    ``(n_blocks, block)`` float32 blocks for them (each element encoded to its nearest level). Ratio 1.0 is
    always tried first and a later candidate replaces a block's best only if strictly better, so ties keep 1.0
    and the search is never worse than the format's rule for the searched error. Only the running best is kept.

    ``refit=True``, for formats decoding ``levels * parts["scales"][:, None]`` with one fp32 scale: the
    least-squares scale of the levels the best candidate chose, ``s* = sum(w x l) / sum(w l^2)``, re-encoded.
    As llama.cpp's ``make_qx_quants`` and ``quantize_row_iq4_nl_impl``: candidates are scanned, each one's levels
    give a weighted least-squares scale, the best by weighted squared error wins. Differently: llama.cpp keeps the
    candidate's codes with s* (its error is that of those codes) and never the unrefitted candidate; here s* is
    re-encoded to the nearest levels (the codes may change; per element that is never worse than the old codes
    for s*, since the error is a sum of nonnegative per-element terms) and the unrefitted candidate competes too.
    llama.cpp scans ratios around 1 (about 0.82 to 1.29 for q3_K's nmax = 4, 0.95 to 1.06 for iq4_nl); the
    default grid here reaches from 1.1 down to 0.3, since lower bit widths want deeper clipping. Without an
    importance matrix llama.cpp weighs each element by x^2 (``make_qx_quants``' rmse_type 1, iq4_nl), and with
    one by ``qw * sqrt(sigma2 + x^2)`` in iq4_nl; here ``weights`` is whatever the caller passes, None = 1.
    """
    _check_blocks(blocks, weights)
    grid = [1.0] + [float(r) for r in (COARSE_RATIOS if ratios is None else ratios) if float(r) != 1.0]
    if any(not r > 0 for r in grid):
        raise InputError(f"ratios must be positive clipping ratios (1.0 = the format's rule), got {list(ratios)}")
    n = blocks.shape[0]
    state: dict = {}

    def consider(ratio: torch.Tensor, parts: Parts | None = None) -> torch.Tensor:
        """Roundtrip one candidate per block; keep it where strictly better. Returns its decode."""
        parts = propose(ratio) if parts is None else parts
        if not state:
            bad = [k for k, v in parts.items() if v.dim() == 0 or v.shape[0] != n]
            if bad:
                raise InputError(f"propose returned parts {bad} whose dim 0 is not n_blocks = {n}")
            if refit and ("scales" not in parts or parts["scales"].dtype != torch.float32):
                raise InputError("refit=True needs a float32 parts['scales'] that multiplies the levels")
        decoded = roundtrip(parts)
        err = _error(decoded, blocks, weights)
        if not state:
            state.update(best=parts, err=err, ratio=ratio, decoded=decoded)
            return decoded
        better = err < state["err"]
        state["best"] = _select(better, parts, state["best"])
        state["err"] = torch.where(better, err, state["err"])
        state["ratio"] = torch.where(better, ratio, state["ratio"])
        state["decoded"] = torch.where(better[:, None], decoded, state["decoded"])
        return decoded

    for r in [1.0] if start is not None else grid:
        consider(torch.full((n,), r, dtype=torch.float32, device=blocks.device))
    if start is not None:
        consider(start.to(torch.float32))
    elif ratios is None:  # refine around each block's best ratio
        centre = state["ratio"].clone()
        for step in FINE_STEPS:
            consider((centre + step).clamp(min=0.05))
    if refit:
        for _ in range(REFITS):
            best = state["best"]
            fitted = {**best, "scales": _refit_scale(blocks, weights, state["decoded"], best["scales"])}
            consider(state["ratio"], fitted)
    return state["best"]


def _minmax_init(blocks: torch.Tensor, qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """lowbit's min/max rule (AsymmetricInt): the range widened to hold 0, s = range / qmax, z = -lo / s (float)."""
    lo = blocks.amin(dim=1).clamp(max=0)
    hi = blocks.amax(dim=1).clamp(min=0)
    s = (hi - lo) / qmax
    return s, -lo / s.clamp(min=_TINY)


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """Generalised soft-thresholding, the proximal step of |e|^p (Badri & Shaji 2023, eq. 5; hqq shrink_lp_op):
    sign(x) * relu(|x| - |x|^(p-1) / beta). At x = 0, 0^(p-1) is inf and the relu gives 0, not NaN."""
    a = x.abs()
    return (a - a.pow(p - 1) * (1.0 / beta)).clamp_(min=0).mul_(x.sign())  # as hqq: beta inverted first


def _proximal_zero(blocks, s, z, qmax, weights, iters, lp_norm, beta, kappa):
    """Half-quadratic optimisation of a float zero for a fixed scale (Badri & Shaji 2023, eqs. 4-6)."""
    # hqq's arithmetic (a reciprocal scale; q = round(x * inv + z); r = (q - z) / inv) so that from the same
    # init its zeros are reproduced to float rounding, not just up to the odd .5 tie rounded the other way.
    inv = 1.0 / s[:, None]
    # An all-zero block (s = 0) or a subnormal one (1 / s = inf) has nothing to fit: it keeps its zero.
    dead = ~torch.isfinite(inv)
    inv = torch.where(dead, torch.ones_like(inv), inv)
    z0 = z = z[:, None].clone()
    if weights is not None:
        wsum = weights.sum(dim=1, keepdim=True)
        alive, wsum = wsum > 0, wsum.clamp(min=_TINY)  # a block whose weights are all 0 keeps its zero
    for _ in range(iters):
        q = torch.round(blocks * inv + z).clamp_(0, qmax)
        e = _shrink_lp(blocks - (q - z) / inv, beta, lp_norm)
        target = q - (blocks - e) * inv  # each element's zero that would decode it to x - e
        if weights is None:
            z = target.mean(dim=1, keepdim=True)
        else:  # the z-step minimises sum(w * (target - z)^2): a weighted mean
            z = torch.where(alive, (weights * target).sum(dim=1, keepdim=True) / wsum, z)
        beta *= kappa
    return torch.where(dead, z0, z)[:, 0]


def hqq_search(
    blocks: torch.Tensor,
    *,
    bits: int,
    weights: torch.Tensor | None = None,
    iters: int = 20,
    lp_norm: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
    round_start: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-block scale and float zero point for the zero-point grid ``w ~ (q - z) * s``,
    ``q = clamp(round(w / s + z), 0, 2^bits - 1)``, by half-quadratic optimisation of the zero (HQQ).

    Start: lowbit's min/max rule (AsymmetricInt), ``lo = min(block.min(), 0)``, ``hi = max(block.max(), 0)``,
    ``s = (hi - lo) / (2^bits - 1)``, ``z = -lo / s``, rounded (``round_start``, as hqq's ``round_zero``, which
    ``HQQLinear`` turns on for 4 bits). Then ``iters`` half-quadratic steps on the zero with ``s`` fixed, as
    hqq's ``optimize_weights_proximal_legacy`` (its default solver): codes at the current zero, the residual
    shrunk by the lp proximal operator (``lp_norm``, ``beta``), the zero refitted as the mean of each element's
    ideal zero. hqq quantizes ``round(W * scale + zero)`` with ``scale = 1 / s``: its zero is this one.
    Differences from hqq 0.2.8: ``beta`` grows by ``kappa`` each step as in the paper and hqq's
    ``optimize_weights_proximal_v2`` (the legacy solver never applies ``kappa``: pass ``kappa=1.0`` to match it);
    no early stop. hqq's stops every block once the whole tensor's mean |error| stops falling, so a block's
    zero depends on the other blocks; on randn and Student-t(2) 4096x64 blocks it fired only at 8 bits (after
    18 and 19 steps), where running on to 20 moved the MSE by under 0.001%, while hqq's rule applied per
    block instead raised the MSE by 0.3-1% at 2, 4 and 8 bits.
    With ``weights`` the zero step is a weighted mean (activation-aware HQQ); the shrink is unchanged, the
    weights multiplying both terms of the half-quadratic split.

    The zero is a float, unclamped as hqq's: it moves the grid by a fraction of a step, which an integer zero
    cannot. Rounding it loses the gain; measured on the embedded SmolLM2, int4 group 64, mean KL (default
    protocol): rounded after optimising, then least-squares scale refits, 0.303; the min/max rule 0.297;
    float 0.206, from a rounded start 0.197 (the hqq package: 0.204, HQQLinear's default 0.196). So the
    ``@hqq`` searches store it as float16, as hqq does (docs/formats.md#zero-point-integers).
    Returns float32 ``(n_blocks,)`` scale and zero. All-zero blocks give ``s = 0, z = 0``.
    """
    _check_blocks(blocks, weights)
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise InputError(f"bits must be an int from 1 to 8, got {bits!r}")
    if iters < 0 or not 0 < lp_norm <= 1 or not beta > 0 or not kappa >= 1:
        raise InputError(
            f"hqq needs iters >= 0, 0 < lp_norm <= 1, beta > 0, kappa >= 1; got {iters}, {lp_norm}, {beta}, {kappa}"
        )
    qmax = 2**bits - 1
    s, z = _minmax_init(blocks, qmax)
    if round_start:
        z = torch.round(z)
    return s, _proximal_zero(blocks, s, z, qmax, weights, iters, lp_norm, beta, kappa)
