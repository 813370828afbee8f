"""Optional fast CPU kernels.

``lowbit.kernels.library.native`` is the ctypes handle to the C library built at install time,
or None when it is absent (the build failed). When it loads, importing this package makes
``lowbit.kernels.paths`` and ``lowbit.kernels.linear`` register their fast paths with
``lowbit.dispatch``, which alone decides whether they run (``LOWBIT_KERNELS=reference|native``);
the modules that ask dispatch for a fast path import this package so that they are registered.
The quantize/dequantize kernels are tested bit-for-bit against the plain-PyTorch reference; the
fused linear kernel and the decode step (``llama_step``) to float32 rounding (tests/kernels,
tests/test_generation.py).
"""

from __future__ import annotations

from .. import dispatch
from .library import native

if native is not None:
    from . import linear, paths  # noqa: F401  (register the fast paths)


def enabled() -> bool:
    """Whether the fast paths run now: the library loaded and the native path preferred."""
    return native is not None and dispatch.preference() == "native"
