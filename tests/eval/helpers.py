"""What the reference and cache tests share: a causal LM and an encoder in miniature, small enough to compute
a reference in milliseconds, and the helpers that count their loads or damage their cache files."""

import os
from types import SimpleNamespace

import torch
from torch import nn

from lowbit.eval.cache import read_header
from lowbit.eval.reference import Reference, causal_reference

VOCAB, WINDOW, WINDOWS = 300, 16, 3
SMOLLM2_WINDOWS = 2  # windows of the embedded text that the SmolLM2 reference (conftest.setup) holds


class TinyLM(nn.Module):
    """A causal LM in miniature: embedding -> tanh -> vocabulary head, logits as transformers returns them."""

    def __init__(self):
        super().__init__()
        self.embed, self.head = nn.Embedding(VOCAB, 16), nn.Linear(16, VOCAB)

    def forward(self, ids):
        return SimpleNamespace(logits=self.head(torch.tanh(self.embed(ids))))


class Loads:
    """A ``load_model`` that counts how often the reference had to be computed."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self):
        self.calls += 1
        return self.model


def never():
    raise AssertionError("the model was loaded although it must not be")


def reference(lm, load=None, **kwargs) -> Reference:
    model, ids, protocol = lm
    return causal_reference(load or (lambda: model), ids, protocol, "tiny-sha", progress=False, **kwargs)


def overwrite(path, tensor, data=b"\xff\xff", at=None):
    """Bytes inside one tensor's data replaced in place: the file keeps its size and its header."""
    fd = os.open(path, os.O_RDWR)
    try:
        tensors, _, start = read_header(fd)
        begin, end = tensors[tensor]["data_offsets"]
        at = (end - begin) // 2 if at is None else at  # the middle: the second of three rows
        os.pwrite(fd, data, start + begin + at)
    finally:
        os.close(fd)


class CharTokenizer:
    def __call__(self, texts, truncation, max_length, padding, return_tensors):
        rows = [[ord(c) % 50 for c in text[:max_length]] for text in texts]
        width = max(map(len, rows))
        return {"input_ids": torch.tensor([r + [0] * (width - len(r)) for r in rows]),
                "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])}


class TinyEncoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 8)

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))
