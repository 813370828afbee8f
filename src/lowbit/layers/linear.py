"""QuantLinear: an nn.Linear whose weight is held packed, as a QuantizedTensor."""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from .. import dispatch
from ..errors import InputError
from ..tensor import QuantizedTensor
from .rotation import hadamard_block, rotate, unrotate


class QuantLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W`` stored packed.

    Forward runs the fused kernel of ``lowbit.dispatch``'s ``("linear", family)`` where one
    applies (CPU, float32: ``lowbit.kernels.linear``), which reads the packed parts without
    building the dense weight and sums the products in its own order, so it matches the
    reference to float32 rounding, not to the bit. Elsewhere, or under
    ``LOWBIT_KERNELS=reference``, forward dequantizes the weight and calls ``F.linear``.

    The packed parts are a plain attribute, not parameters or buffers, on purpose:
    ``model.half()`` or ``model.to(torch.bfloat16)`` must not cast stored fp32 scales
    (that would change the numbers). Device moves do apply to them (see ``_apply``).
    The bias is the original ``nn.Parameter`` and behaves exactly as in ``nn.Linear``.

    ``materialize()`` keeps the dequantized weight as a plain tensor, so evaluation does
    not decode on every call; results are bitwise identical to the reference packed path
    because both decode the same parts the same way and then cast to the input's dtype.
    There is deliberately no ``weight`` attribute: code that reads it would silently
    see something other than what forward uses.

    ``signs`` (``+had``, ``lowbit.layers.rotation``): the stored weight is ``W Q`` and forward rotates the input,
    ``y = (W Q)(Q^T x)``; the int8 signs are held like the packed parts and counted in ``nbytes``.
    """

    def __init__(self, qweight: QuantizedTensor, bias: torch.Tensor | None = None,
                 signs: torch.Tensor | None = None):
        super().__init__()
        if len(qweight.shape) != 2:
            raise InputError(f"QuantLinear needs a 2-D weight, got shape {tuple(qweight.shape)}")
        self.out_features, self.in_features = (int(d) for d in qweight.shape)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise InputError(f"bias shape {tuple(bias.shape)} does not match out_features={self.out_features}")
        self.qweight = qweight
        self.bias = bias if bias is None or isinstance(bias, nn.Parameter) else nn.Parameter(bias, False)
        self._dequantized: torch.Tensor | None = None
        if signs is not None and (signs.dtype != torch.int8 or tuple(signs.shape) != (self.in_features,)):
            raise InputError(f"rotation signs must be ({self.in_features},) int8, got {tuple(signs.shape)} "
                             f"{signs.dtype}")
        self.signs = signs
        self.rotation_block = hadamard_block(self.in_features) if signs is not None else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, qweight: QuantizedTensor, signs: torch.Tensor | None = None) -> QuantLinear:
        if tuple(qweight.shape) != tuple(linear.weight.shape):
            raise InputError(f"weight shape {tuple(qweight.shape)} != layer shape {tuple(linear.weight.shape)}")
        return cls(qweight, linear.bias, signs)

    @property
    def nbytes(self) -> int:
        """Stored bytes: the packed weight, and the rotation's signs if any."""
        return self.qweight.nbytes + (0 if self.signs is None else self.signs.numel())

    def effective_weight(self) -> torch.Tensor:
        """The weight in the input's own basis (``W Q Q^T``), float32: what the layer computes with."""
        w = self.dequantized_weight(torch.float32)
        return w if self.signs is None else unrotate(w, self.signs, self.rotation_block)

    @property
    def materialized(self) -> bool:
        return self._dequantized is not None

    def materialize(self) -> QuantLinear:
        """Cache the dequantized weight (in the stored dtype); costs its full-precision bytes."""
        self._dequantized = self.qweight.dequantize()
        return self

    def release(self) -> QuantLinear:
        """Drop the cached dequantized weight; forward decodes the packed parts again."""
        self._dequantized = None
        return self

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight forward uses, ``(out_features, in_features)``, in ``dtype`` (default: stored)."""
        w = self._dequantized if self._dequantized is not None else self.qweight.dequantize()
        return w if dtype is None else w.to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.signs is not None:
            x = rotate(x, self.signs.to(x.device), self.rotation_block)
        if self._dequantized is None:
            fused = dispatch.lookup("linear", self.qweight.format.family)
            y = None if fused is None else fused(self.qweight, x, self.bias)
            if y is not None:
                return y
        w = self.dequantized_weight(x.dtype).to(x.device)  # (out, in)
        b = None if self.bias is None else self.bias.to(dtype=x.dtype, device=x.device)
        return F.linear(x, w, b)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        # Ask ``fn`` where an empty float tensor would go: that gives the target device of
        # .to()/.cuda()/.cpu() without letting a dtype cast touch the packed parts.
        device = fn(torch.empty(0, device=_device_of(self.qweight))).device
        if device != _device_of(self.qweight):
            parts = {k: t.to(device) for k, t in self.qweight.parts.items()}
            self.qweight = _with_parts(self.qweight, parts)
            if self._dequantized is not None:
                self._dequantized = self._dequantized.to(device)
            if self.signs is not None:
                self.signs = self.signs.to(device)
        return self

    def extra_repr(self) -> str:
        q = self.qweight
        dq = ", double_quant" if q.double_quant else ""
        mat = (", hadamard-rotated" if self.signs is not None else "") + (", materialized" if self.materialized else "")
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"format={q.format.name}, block={q.block_size}{dq}, {q.bits_per_weight:.3f} bits/weight{mat}"
        )


def _device_of(q: QuantizedTensor) -> torch.device:
    return next(iter(q.parts.values())).device if q.parts else torch.device("cpu")


def _with_parts(q: QuantizedTensor, parts: dict[str, torch.Tensor]) -> QuantizedTensor:
    return dataclasses.replace(q, parts=parts)
