"""The one place that chooses between the plain-PyTorch reference path and a fast kernel.

Fast paths register here per (operation, family) (``lowbit.kernels`` does so for the C
kernels when it is imported); the code that runs an operation asks ``lookup(op, family)`` and
runs the reference path when it gets None. This module imports no kernel: it sits below them,
and the modules that run formats on tensors (``lowbit.tensor``, ``pipeline``, ``quantize``)
import ``lowbit.kernels`` so that its paths are registered before they are asked for. Formats
never import a kernel module: they are the reference. The preference is ``native`` (use a
registered kernel where one applies) unless the environment says ``LOWBIT_KERNELS=reference``,
``use("reference")`` is in effect, or an operation is given ``kernels="reference"``
(``lowbit.quantize``, ``dequantize``).
Every registered kernel is tested against the reference path (tests/kernels): to the bit,
except ``linear``, which sums in its own order (to float32 rounding, a stated bound).

Operations: ``quantize`` (flat float32 tensor -> packed parts, absmax scales only),
``dequantize`` (packed parts -> flat float32), ``round`` (an ExMy table rounding),
``lut_scale`` (level table look-up times a per-block factor), ``linear`` (``QuantLinear``'s
product straight from the packed parts, ``lowbit.kernels.linear``).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager

from .errors import InputError

PREFERENCES = ("native", "reference")
_PATHS: dict[tuple[str, str], Callable] = {}
_preference: str | None = None  # set by use(); None: the environment decides


def register(op: str, *families: str):
    """Decorator: ``fn`` is the fast path of ``op`` for each of ``families``."""

    def add(fn: Callable) -> Callable:
        for family in families:
            if (op, family) in _PATHS:
                raise RuntimeError(f"a fast path for ({op!r}, {family!r}) is registered twice")
            _PATHS[op, family] = fn
        return fn

    return add


def check_preference(name: str) -> str:
    key = name.strip().lower()
    if key not in PREFERENCES:
        raise InputError(f"unknown kernel preference {name!r}: use one of {', '.join(PREFERENCES)}")
    return key


def preference() -> str:
    if _preference is not None:
        return _preference
    return "reference" if os.environ.get("LOWBIT_KERNELS", "").strip().lower() == "reference" else "native"


@contextmanager
def use(name: str | None):
    """Within the block, prefer ``name`` ("native" or "reference"); None leaves it as it is."""
    global _preference
    saved = _preference
    if name is not None:
        _preference = check_preference(name)
    try:
        yield
    finally:
        _preference = saved


def lookup(op: str, family: str) -> Callable | None:
    """The registered fast path, or None: none registered, or the reference path preferred."""
    if preference() == "reference":
        return None
    return _PATHS.get((op, family))


def registered() -> list[tuple[str, str]]:
    return sorted(_PATHS)
