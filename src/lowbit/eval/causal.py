"""Score a causal LM against the cached reference (llama.cpp ``perplexity --kl-divergence``).

The metrics: README.md#evaluation-protocol.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from .blockwise import Resident, window_logprobs
from .reference import Reference


def score_causal(model: nn.Module | Resident, reference: Reference, *, label: str = "evaluating",
                 progress: bool = True) -> dict:
    """Per scored token: KL(p_ref || p_model) over the full vocabulary, NLL, top-token agreement. ``model``: a
    model, or a ``lowbit.eval.blockwise.Resident`` saying how its blocks' weights come into memory; it runs block
    by block (``window_logprobs``), and each window's log-probabilities are scored and dropped.

    Returns ``ppl``, ``kl_mean``, ``kl_median``, ``kl_p99``, ``kl_max``, ``top1`` (fraction of
    tokens whose most likely next token is the reference's), ``tokens`` (how many were scored) and ``kl_quantiles``
    (the distribution's shape, for the report).
    """
    kl, nll, same = [], [], []

    def score(i: int, lq: torch.Tensor) -> None:  # lq: (W-1, vocab)
        kl.append(reference.kl(i, lq))
        nll.append(-lq.gather(1, reference.ids[i, 1:, None]).squeeze(1))
        same.append(lq.argmax(dim=1) == reference.top1[i])

    window_logprobs(model, reference.ids, score, label=label, progress=progress)
    kl_all = torch.cat(kl).double().numpy()
    return {
        "ppl": float(torch.cat(nll).double().mean().exp()),
        **kl_summary(kl_all),
        "top1": float(torch.cat(same).double().mean()),
        "tokens": int(kl_all.size),
        "kl_quantiles": kl_quantiles(kl_all),
    }


# Quantile levels of per-token KL kept in each row for the report's distribution figure: llama.cpp's
# `perplexity --kl-divergence` prints the minimum, 1%, 5%, 10%, median, 90%, 95%, 99%, 99.9% and maximum
# (tools/perplexity/perplexity.cpp); the quartiles and 98%, 99.5%, 99.8% fill in the curve and its tail.
KL_QUANTILES = (0.0, 0.01, 0.05, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999, 1.0)


def kl_quantiles(kl: np.ndarray) -> dict:
    """Per-token KL at ``KL_QUANTILES`` (linear interpolation, as ``kl_p99``): ``{"q": levels, "kl": values}``."""
    return {"q": list(KL_QUANTILES), "kl": [float(v) for v in np.quantile(kl, KL_QUANTILES)]}


def kl_summary(kl: np.ndarray) -> dict:
    """Mean, median, 99th percentile (linear interpolation) and max of per-token KL."""
    return {
        "kl_mean": float(kl.mean()),
        "kl_median": float(np.median(kl)),
        "kl_p99": float(np.quantile(kl, 0.99)),
        "kl_max": float(kl.max()),
    }
