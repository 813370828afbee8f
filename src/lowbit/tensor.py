"""QuantizedTensor: the packed bytes of one quantized tensor and how to read them."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import dispatch
from . import kernels as _kernels  # noqa: F401  (registers the fast paths that dispatch looks up)
from .formats.registry import codec_for
from .formats.spec import FormatSpec
from .scaling import double_quant
from .scaling.packing import unpack_codes


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """What is stored: ``parts`` (named tensors), and what is needed to read them.

    ``parts["codes"]`` holds element codes packed ``format.bits`` to a byte run (high bits
    first); GGUF formats store one ``parts["data"]`` with the GGUF block bytes instead.
    """

    format: FormatSpec
    shape: torch.Size
    dtype: torch.dtype
    block_size: int
    parts: dict[str, torch.Tensor] = field(repr=False)
    double_quant: bool = False

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes actually stored: codes, scales and per-tensor constants."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / self.numel if self.numel else 0.0

    def tobytes(self) -> bytes:
        """The stored parts back to back, in order (for GGUF formats: exactly the GGUF tensor data)."""
        return b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in self.parts.values())

    def dequantize(self, dtype: torch.dtype | None = None, *, kernels: str | None = None) -> torch.Tensor:
        """A tensor of the input's shape and dtype (or ``dtype``). ``kernels``: "native" or
        "reference" for this call (``lowbit.dispatch``); the numbers are the same either way."""
        with dispatch.use(kernels):
            out = self._decode_flat()
        return out.to(dtype or self.dtype).reshape(self.shape)

    def _decode_flat(self) -> torch.Tensor:
        n, block = self.numel, self.block_size
        if n == 0:
            return torch.empty(0, dtype=torch.float32)
        parts = dict(self.parts)
        if self.double_quant:
            parts["scales"] = double_quant.decompress(parts)
        codec = codec_for(self.format)
        fast = dispatch.lookup("dequantize", codec.family)
        out = fast(self.format, parts, n, block) if fast is not None else None
        if out is not None:
            return out
        if "codes" in parts:
            parts["codes"] = unpack_codes(parts["codes"], self.format.bits, n)
        n_full, rem = divmod(n, block)
        if not rem:
            return codec.dequantize_blocks(self.format, parts, n_full, block).reshape(-1)
        head, tail = _split_parts(parts, n_full, block)
        out = torch.empty(n, dtype=torch.float32)
        out[: n_full * block] = codec.dequantize_blocks(self.format, head, n_full, block).reshape(-1)
        out[n_full * block :] = codec.dequantize_blocks(self.format, tail, 1, rem).reshape(-1)
        return out

    def __repr__(self) -> str:
        dq = ", double_quant" if self.double_quant else ""
        return (
            f"QuantizedTensor({self.format.name}, shape={tuple(self.shape)}, block={self.block_size}{dq}, "
            f"{self.nbytes} bytes, {self.bits_per_weight:.3f} bits/weight)"
        )


def _split_parts(parts, n_full, block):
    """Per-block parts (dim 0 = blocks) and codes (flat elements) cut into head and tail.

    Per-tensor parts (names starting ``tensor_``) go to both.
    """
    head, tail = {}, {}
    for name, t in parts.items():
        if name.startswith("tensor_"):
            head[name] = tail[name] = t
        elif name == "codes":
            head[name], tail[name] = t[: n_full * block], t[n_full * block :]
        else:
            head[name], tail[name] = t[:n_full], t[n_full:]
    return head, tail
