"""The C library built at install time: ``native``, its ctypes handle (None where the build failed),
and the output buffers its kernels write into."""

from __future__ import annotations

import ctypes
import importlib.util

import torch


def _load():
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
    lib.lowbit_search_table.argtypes = [ptr, ptr, i64, i64, ptr, ptr, ptr, ctypes.c_int, ptr, ptr, ctypes.c_int, ptr,
                                        ptr]
    for name in ("q8_0", "q4_0"):
        getattr(lib, f"lowbit_{name}_quantize").argtypes = [ptr, i64, ptr, ptr]
        getattr(lib, f"lowbit_{name}_dequantize").argtypes = [ptr, ptr, i64, ptr]
    return lib


native = _load()


def empty(n: int, dtype: torch.dtype) -> torch.Tensor:
    """A fresh 1-D output buffer, advised to use huge pages when large (see lowbit_advise_huge)."""
    t = torch.empty(n, dtype=dtype)
    nbytes = n * t.element_size()
    if native is not None and nbytes >= 4 << 20:
        native.lowbit_advise_huge(t.data_ptr(), nbytes)
    return t
