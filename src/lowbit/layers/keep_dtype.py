"""The dtype of the tensors quantization leaves alone (embeddings, norms, biases): ``--keep-dtype``.

A saved model stores them in this dtype; ``lowbit compare`` rounds them the same way before
scoring (computing in float32, as the reloaded model does), so the KL it reports includes
what the narrower dtype costs. A reloaded model computes in float32 from tensors cast up as they
are read, but an embedding table, which only gives rows, stays as stored (``NarrowEmbedding``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InputError

KEEP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_keep_dtype(name: str) -> torch.dtype:
    if name not in KEEP_DTYPES:
        raise InputError(f"--keep-dtype must be one of {', '.join(KEEP_DTYPES)}, got {name!r}")
    return KEEP_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in KEEP_DTYPES.items() if v == dtype)


def round_state(model: nn.Module, dtype: torch.dtype) -> int:
    """Round every floating tensor of ``model.state_dict()`` through ``dtype``, in place (packed
    QuantLinear parts are not in it). Returns the bytes this saves when stored in ``dtype``;
    a tensor reachable under two names (tied) counts once."""
    saved, seen = 0, set()
    for t in model.state_dict(keep_vars=True).values():
        if not t.is_floating_point() or t.dtype == dtype or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        with torch.no_grad():
            t.copy_(t.to(dtype))
        saved += t.numel() * (t.element_size() - dtype.itemsize)
    return saved


class NarrowEmbedding(nn.Embedding):
    """An ``nn.Embedding`` whose table stays in the dtype it was stored in (``--keep-dtype bf16``/``fp16``) and whose
    rows come out in ``compute_dtype``, the dtype the rest of the model computes in. A lookup only copies rows and
    float32 holds every bfloat16 and float16 value, so the rows are those of the table cast up first, bit for bit,
    at half its memory: Llama 3 8B's untied 128256 x 4096 table takes 1.05 GB, not 2.1 GB. transformers'
    ``model.dtype`` (its first floating parameter's) then names the table's dtype, not the compute's."""

    def __init__(self, embedding: nn.Embedding, table: torch.Tensor):
        """``embedding``'s twin (built in the compute dtype, on any device) holding ``table`` as it is."""
        super().__init__(embedding.num_embeddings, embedding.embedding_dim, embedding.padding_idx,
                         scale_grad_by_freq=embedding.scale_grad_by_freq, sparse=embedding.sparse, _weight=table,
                         _freeze=not embedding.weight.requires_grad)
        self.compute_dtype = embedding.weight.dtype

    @staticmethod
    def fits(module: nn.Module, table: torch.Tensor) -> bool:
        """Whether ``module`` computes the same from ``table`` kept narrow: a plain ``nn.Embedding`` (a subclass may
        work on the rows, e.g. scale them, before they would be cast) without ``max_norm`` (which renormalizes the
        table itself), in a wider float dtype than ``table``'s."""
        return (type(module) is nn.Embedding and module.max_norm is None and table.is_floating_point()
                and module.weight.is_floating_point() and table.dtype.itemsize < module.weight.dtype.itemsize)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(input).to(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        # model.half() or .to(torch.bfloat16) casts what the model computes in: the rows follow (a move keeps it)
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)
