"""Optional fast CPU kernels, one interface, same numbers as the reference path.

``lowbit.kernels.native`` is the ctypes handle to the C library built at install time,
or None when it is absent (build failed) or disabled with ``LOWBIT_KERNELS=reference``.
Every kernel is tested bit-for-bit against the plain-PyTorch reference (tests/kernels).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import torch


def _load():
    if os.environ.get("LOWBIT_KERNELS", "").lower() == "reference":
        return None
    spec = importlib.util.find_spec("lowbit.kernels._ckernels")
    if spec is None or spec.origin is None:
        return None
    lib = ctypes.CDLL(spec.origin)
    i64, ptr, u8 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_uint8
    lib.lowbit_codebook4_quantize.argtypes = [ptr, i64, i64, ptr, ptr, u8, ptr, ptr]
    lib.lowbit_codebook4_dequantize.argtypes = [ptr, ptr, ptr, i64, i64, ptr]
    lib.lowbit_advise_huge.argtypes = [ptr, i64]
    lib.lowbit_lut_scale.argtypes = [ptr, i64, i64, ptr, ptr, ptr]
    lib.lowbit_table_round.argtypes = [ptr, i64, ptr, ctypes.c_int, ptr, ptr, ctypes.c_int, ptr]
    lib.lowbit_int_sym_quantize.argtypes = [ptr, i64, i64, ctypes.c_int, ptr, ptr]
    lib.lowbit_int_sym_dequantize.argtypes = [ptr, ptr, i64, i64, ctypes.c_int, ptr]
    for name in ("q8_0", "q4_0"):
        getattr(lib, f"lowbit_{name}_quantize").argtypes = [ptr, i64, ptr, ptr]
        getattr(lib, f"lowbit_{name}_dequantize").argtypes = [ptr, ptr, i64, ptr]
    return lib


native = _load()
_enabled = native is not None


def empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A fresh 1-D output buffer, advised to use huge pages when large (see lowbit_advise_huge)."""
    t = torch.empty(n, dtype=dtype)
    nbytes = n * t.element_size()
    if native is not None and nbytes >= 4 << 20:
        native.lowbit_advise_huge(t.data_ptr(), nbytes)
    return t


def enabled() -> bool:
    return _enabled


class reference:
    """Context manager: run the plain-PyTorch reference path (for tests and comparisons)."""

    def __enter__(self):
        global _enabled
        self._saved, _enabled = _enabled, False
        return self

    def __exit__(self, *exc):
        global _enabled
        _enabled = self._saved


def lut_scale(codes: torch.Tensor, table: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """table[codes] * scales[:, None] for (n_blocks, block) uint8 codes; None without kernels."""
    if not _enabled:
        return None
    n_blocks, block = codes.shape
    codes = codes.contiguous()
    full = torch.zeros(256, dtype=torch.float32)
    full[: table.numel()] = table
    scales = scales.to(torch.float32).contiguous()
    out = empty(codes.numel(), torch.float32)
    native.lowbit_lut_scale(codes.data_ptr(), codes.numel(), block, full.data_ptr(), scales.data_ptr(), out.data_ptr())
    return out.view(n_blocks, block)
