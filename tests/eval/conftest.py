"""Fixtures of the eval tests (tests/eval/helpers.py holds the models in miniature)."""

import pytest
import torch

from lowbit.eval import causal_reference, read_text, token_windows
from lowbit.eval.protocol import Protocol

from .helpers import SMOLLM2_WINDOWS, VOCAB, WINDOW, WINDOWS, TinyLM


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    ids = torch.randint(0, VOCAB, (WINDOWS, WINDOW))
    return TinyLM(), ids, Protocol("tiny text", "t" * 64, WINDOW, WINDOWS, "k" * 64)


@pytest.fixture
def root(tmp_path, monkeypatch):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def setup(smollm2):
    model, tokenizer, info, _ = smollm2
    name, text = read_text(None)
    ids, protocol = token_windows(tokenizer, text, name, windows=SMOLLM2_WINDOWS)
    ref = causal_reference(lambda: model, ids, protocol, info.file_hash, progress=False)
    return model, ids, protocol, info, ref
