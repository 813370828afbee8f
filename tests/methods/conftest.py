"""Fixtures the QAT tests share (test_qat.py, test_qat_train.py)."""

import copy

import pytest

from lowbit import load_model


@pytest.fixture(scope="module")
def _tiny(tiny_lm_dir):
    return load_model(tiny_lm_dir)[0]


@pytest.fixture
def tiny(_tiny):
    """A fresh copy of the 2-layer model for each test (prepare changes it in place)."""
    return copy.deepcopy(_tiny)
