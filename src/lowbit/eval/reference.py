"""The original model's predictions over the protocol's windows, computed once and cached.

A causal LM's reference is its log-softmax over the full vocabulary at every scored
position, stored as float16 (llama.cpp's ``--kl-divergence-base`` file stores a 16-bit
form too): 16 windows of 512 tokens with SmolLM2's 49152-token vocabulary take 0.8 GB,
float32 would take 1.6 GB. fp16 keeps ~3 significant digits where probability mass is
(log p near 0). KL is computed from the stored values renormalised (``lse``: their
logsumexp per token), so the rounding enters KL only at second order: the model against
its own cache scores a mean KL of ~3e-7. The reference's own NLL and top token are
stored exactly (fp32 / int64) alongside.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..io.atomic import atomic_file
from ..progress import progress_bar
from .cache import cache_path
from .protocol import Protocol


@dataclass
class Reference:
    """``ids`` (n, W); ``nll``, ``top1``, ``lse`` (n, W-1); log-probs read per window from ``path``."""

    path: Path
    ids: torch.Tensor
    nll: torch.Tensor
    top1: torch.Tensor
    lse: torch.Tensor
    _scratch: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    def kl(self, i: int, logprobs: torch.Tensor) -> torch.Tensor:
        """Window ``i``: (W-1,) KL(p_ref || q) per token, given q's (W-1, vocab) log-probs.

        Computed as ``sum p_ref (log p_ref - log q)`` term by term, not as a difference of two
        large sums (which cancels badly when q is close). Two scratch buffers are reused
        across windows: fresh 100 MB tensors cost more in page faults than the arithmetic.
        """
        with safe_open(self.path, framework="pt") as f:
            stored = f.get_slice("logprobs")[i]  # (W-1, vocab) fp16
        if self._scratch is None or self._scratch[0].shape != stored.shape:
            self._scratch = (torch.empty(stored.shape), torch.empty(stored.shape))
        log_p, p = self._scratch
        log_p.copy_(stored).sub_(self.lse[i, :, None])  # renormalised reference log-probs
        torch.exp(log_p, out=p)
        log_p.sub_(logprobs)
        return torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(-1)  # row-wise dot products

    @property
    def ppl(self) -> float:
        return float(self.nll.double().mean().exp())


def causal_reference(load_model: Callable[[], nn.Module], ids: torch.Tensor, protocol: Protocol, model_hash: str, *,
                     progress=True) -> Reference:
    """The cached reference for (model file, tokens, protocol); if missing, ``load_model()`` computes it."""
    path = cache_path("ref-causal", model=model_hash, protocol=protocol.to_dict())
    if path.is_file():
        try:
            return _read(path)
        except Exception:  # a damaged cache file is recomputed, never trusted
            path.unlink(missing_ok=True)
    _check_writable(path.parent)  # before minutes of work, not after
    model = load_model()
    columns = {k: [] for k in ("nll", "top1", "lse")}
    logprobs = None  # (n, W-1, vocab) fp16, filled in place: one copy in memory, not a list and its stack
    with progress_bar(len(ids), "reference model", enabled=progress) as advance:
        for i, window in enumerate(ids):
            lp = next_token_logprobs(model, window)  # (W-1, vocab)
            if logprobs is None:
                logprobs = torch.empty((len(ids), *lp.shape), dtype=torch.float16)
            stored = logprobs[i]
            stored.copy_(lp)
            columns["lse"].append(torch.logsumexp(stored.float(), dim=-1))  # (W-1,)
            columns["nll"].append(-lp.gather(1, window[1:, None]).squeeze(1))
            columns["top1"].append(lp.argmax(dim=1))
            advance()
    tensors = {"ids": ids.contiguous(), "logprobs": logprobs, **{k: torch.stack(v) for k, v in columns.items()}}
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata={"model_sha256": model_hash, **{k: str(v) for k, v in
                                                                           protocol.to_dict().items()}})
    return _read(path)


@torch.inference_mode()
def next_token_logprobs(model, window: torch.Tensor) -> torch.Tensor:
    """(W,) token ids -> (W-1, vocab) float32 log-probabilities of each next token."""
    logits = model(window[None]).logits[0, :-1].float()
    # not torch.log_softmax: its fused CPU kernel's normalisation is off by ~1e-5 (sum p - 1),
    # which would bias every KL by as much; logsumexp is accurate to ~1e-7.
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


def _check_writable(directory: Path) -> None:
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OSError(f"cannot create the reference cache {directory} ({e.strerror}); set LOWBIT_CACHE") from e
    if not os.access(directory, os.W_OK):
        raise PermissionError(f"cannot write to the reference cache {directory}; set LOWBIT_CACHE")


def _read(path: Path) -> Reference:
    with safe_open(path, framework="pt") as f:
        # clone: the tensors may map the file, and a file truncated under a mapping faults (SIGBUS)
        return Reference(path, *(f.get_tensor(k).clone() for k in ("ids", "nll", "top1", "lse")))
