"""Score an encoder (sentence-embedding model) by how far its embeddings move.

Protocol (README): the text's paragraphs (blocks between blank lines, longer than 40
characters, the first 512), each truncated to 128 tokens, mean-pooled over the attention
mask; per paragraph 1 - cosine(original, quantized); report mean and max.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch
from torch import nn

from ..cachedir import writable_root
from ..errors import InputError
from ..progress import progress_bar
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
from .protocol import paragraphs

KIND = "ref-encoder"
MAX_TOKENS = 128
BATCH = 32


@torch.inference_mode()
def embed(model, tokenizer, texts: list[str], *, label: str = "embedding", progress: bool = True) -> torch.Tensor:
    """(len(texts), hidden) float32 mean-pooled last hidden states."""
    out = []
    batches = range(0, len(texts), BATCH)
    with progress_bar(len(batches), label, enabled=progress) as advance:
        for start in batches:
            enc = tokenizer(texts[start : start + BATCH], truncation=True, max_length=MAX_TOKENS, padding=True,
                            return_tensors="pt")
            hidden = model(**enc).last_hidden_state.float()  # (B, T, H)
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp_min(1))
            advance()
    return torch.cat(out)


def encoder_reference(load_model: Callable[[], nn.Module], tokenizer, text: str, model_hash: str, *,
                      text_name: str = "", model_name: str = "", model_source: str = "",
                      progress=True) -> tuple[list[str], torch.Tensor]:
    """The text's paragraphs and the original model's embeddings of them (cached; ``load_model()`` on a miss).

    A cached file is verified against its checksums first, as the causal reference is; ``text_name``,
    ``model_name`` and ``model_source`` only label the entry in ``lowbit cache``.
    """
    texts = paragraphs(text)
    if not texts:
        raise InputError("the text has no paragraph longer than 40 characters to embed")
    key = hashlib.sha256("\0".join(texts).encode()).hexdigest()
    path = cache_path(KIND, model=model_hash, paragraphs=key, max_tokens=MAX_TOKENS)
    cached = open_cached(path, lambda f: _embeddings(f, len(texts)))
    if cached is not None:
        return texts, cached
    writable_root()  # before the model runs, not after
    model = load_model()
    emb = embed(model, tokenizer, texts, label="reference model", progress=progress)
    description = {"kind": KIND, "version": CACHE_VERSION, "model": model_name or model_label(model),
                   "source": model_source, "model_sha256": model_hash, "text": text_name, "paragraphs_sha256": key,
                   "paragraphs": len(texts), "max_tokens": MAX_TOKENS, "created": created_now()}
    write_entry(path, {"embeddings": emb}, description)
    return texts, emb


def _embeddings(f: CacheFile, n: int) -> torch.Tensor:
    emb = f.tensor("embeddings")
    if emb.dim() != 2 or emb.shape[0] != n:
        raise CacheIntegrityError(f"it holds {tuple(emb.shape)} embeddings for {n} paragraphs")
    return emb


def score_encoder(model, tokenizer, texts: list[str], reference: torch.Tensor, *, label="evaluating",
                  progress=True) -> dict:
    """``cos_dist_mean`` and ``cos_dist_max`` of 1 - cosine(reference, model) over the paragraphs."""
    emb = embed(model, tokenizer, texts, label=label, progress=progress)
    dist = 1 - torch.nn.functional.cosine_similarity(reference.double(), emb.double(), dim=-1)
    return {"cos_dist_mean": float(dist.mean()), "cos_dist_max": float(dist.max()), "sentences": len(texts)}
