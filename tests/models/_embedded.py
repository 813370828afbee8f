"""The embedded SmolLM2 and MiniLM, each loaded once per test session (shared by tests/models and tests/nn).

Both conftests load this file under one module name, so the cache below is shared even
though pytest imports the two conftests separately.
"""

from __future__ import annotations

import time
from functools import cache


@cache
def smollm2():
    """(model, tokenizer, info, seconds to load). Tests must deep-copy the model before changing it."""
    from lowbit import load_model

    start = time.perf_counter()
    model, tokenizer, info = load_model(None)
    return model, tokenizer, info, time.perf_counter() - start


@cache
def minilm():
    from lowbit import load_model

    return load_model("minilm")
