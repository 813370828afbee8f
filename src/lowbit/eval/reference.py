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

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..cachedir import check_space, writable_root
from .blockwise import Resident, resident, window_logprobs
from .cache import (
    CACHE_VERSION,
    CacheFile,
    CacheIntegrityError,
    cache_path,
    created_now,
    model_label,
    open_cached,
    write_entry,
)
from .protocol import Protocol

KIND = "ref-causal"


@dataclass
class Reference:
    """``ids`` (n, W); ``nll``, ``top1``, ``lse`` (n, W-1); log-probs read per window from ``path``."""

    path: Path
    ids: torch.Tensor
    nll: torch.Tensor
    top1: torch.Tensor
    lse: torch.Tensor
    _file: CacheFile | None = field(default=None, repr=False)
    _scratch: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: Path, ids: torch.Tensor | None = None, *, verify: bool = True) -> Reference:
        """The reference in the cache file at ``path``, its checksums verified first (unless not
        ``verify``: a file this process just wrote); ``CacheIntegrityError`` if it does not hold
        a reference over ``ids``."""
        return cls._from(CacheFile(path, verify=verify), ids)

    @classmethod
    def _from(cls, f: CacheFile, ids: torch.Tensor | None = None) -> Reference:
        ref = cls(f.path, *(f.tensor(k) for k in ("ids", "nll", "top1", "lse")), _file=f)
        n, width = ref.ids.shape if ref.ids.dim() == 2 else (0, 0)
        if ref.ids.dim() != 2 or f.shape("logprobs")[:2] != (n, width - 1) or any(
                tuple(t.shape) != (n, width - 1) for t in (ref.nll, ref.top1, ref.lse)):
            raise CacheIntegrityError("its tensors' shapes disagree")
        if ids is not None and not torch.equal(ref.ids, ids):
            raise CacheIntegrityError("its tokens are not the protocol's")
        return ref

    def kl(self, i: int, logprobs: torch.Tensor) -> torch.Tensor:
        """Window ``i``: (W-1,) KL(p_ref || q) per token, given q's (W-1, vocab) log-probs.

        Computed as ``sum p_ref (log p_ref - log q)`` term by term, not as a difference of two
        large sums (which cancels badly when q is close). Two scratch buffers are reused
        across windows: fresh 100 MB tensors cost more in page faults than the arithmetic.
        The stored row is read from the mapping of the file checked when the reference was opened.
        """
        if self._scratch is None:
            shape = self._file.shape("logprobs")[1:]
            self._scratch = (torch.empty(shape), torch.empty(shape))
        log_p, p = self._scratch
        self._file.read_row("logprobs", i, log_p).sub_(self.lse[i, :, None])  # renormalised reference log-probs
        torch.exp(log_p, out=p)
        log_p.sub_(logprobs)
        return torch.bmm(p.unsqueeze(1), log_p.unsqueeze(2)).view(-1)  # row-wise dot products

    @property
    def ppl(self) -> float:
        return float(self.nll.double().mean().exp())


def causal_reference(load_model: Callable[[], nn.Module | Resident], ids: torch.Tensor, protocol: Protocol,
                     model_hash: str, *, model_name: str = "", model_source: str = "", vocab_size: int | None = None,
                     progress=True) -> Reference:
    """The cached reference for (model file, tokens, protocol); if missing, ``load_model()`` computes it: a model,
    or a ``lowbit.eval.blockwise.Resident`` saying how its blocks' weights come into memory (run block by block).

    A cached file is verified against its checksums first; a damaged one is recomputed with a
    one-line notice. Before computing, the disk and memory the reference needs are checked
    (with ``vocab_size``, before the model is even loaded; else after its first window).
    ``model_name`` and ``model_source`` only label the entry in ``lowbit cache``.
    """
    path = cache_path(KIND, model=model_hash, protocol=protocol.to_dict())
    cached = open_cached(path, lambda f: Reference._from(f, ids))
    if cached is not None:
        return cached
    root = writable_root()  # before minutes of work, not after
    n, width = ids.shape
    if vocab_size:
        _check_space(n, width, vocab_size, root)
    model = resident(load_model())
    columns = {k: [] for k in ("nll", "top1", "lse")}
    stored = []  # (n, W-1, vocab) fp16 once the first window gives the vocabulary: one copy, filled in place

    def store(i: int, lp: torch.Tensor) -> None:  # lp: (W-1, vocab)
        if not stored:
            _check_space(n, width, lp.shape[-1], root)
            stored.append(torch.empty((n, *lp.shape), dtype=torch.float16))
        row = stored[0][i]
        row.copy_(lp)
        columns["lse"].append(torch.logsumexp(row.float(), dim=-1))  # (W-1,)
        columns["nll"].append(-lp.gather(1, ids[i, 1:, None]).squeeze(1))
        columns["top1"].append(lp.argmax(dim=1))

    window_logprobs(model, ids, store, label="reference model", progress=progress)
    logprobs = stored.pop()
    tensors = {"ids": ids.contiguous(), "logprobs": logprobs, **{k: torch.stack(v) for k, v in columns.items()}}
    description = {"kind": KIND, "version": CACHE_VERSION, "model": model_name or model_label(model.model),
                   "source": model_source, "model_sha256": model_hash, "protocol": protocol.to_dict(),
                   "vocab": logprobs.shape[-1], "created": created_now()}
    write_entry(path, tensors, description)
    del tensors, logprobs
    return Reference.open(path, ids, verify=False)  # its checksums were computed from these very tensors


def _check_space(n: int, width: int, vocab: int, root: Path) -> None:
    stored = n * (width - 1) * vocab * 2  # the fp16 log-probs
    disk = stored + n * width * 8 + n * (width - 1) * (4 + 8 + 4)  # + ids, nll, top1, lse
    # in memory beside the stored log-probs: one window's fp32 logits, log-probs and fp32 copy of the stored row
    memory = stored + 3 * width * vocab * 4
    check_space(f"the reference ({n} windows × {width - 1} positions × {vocab} log-probs, fp16)", disk=disk,
                memory=memory, directory=root, hint="use fewer or shorter windows")
