"""Learned Step Size Quantization (LSQ, Esser et al., arXiv 1902.08153) of one weight, on ``fake_quantize``.

Each block's scale is a trained parameter. The forward pass is the grid pipeline's own encode and decode
(``lowbit.fake_quant``), so the trained model computes exactly what ``convert()`` stores; the backward pass
is LSQ's: the straight-through estimator for the rounding, and for the step s of a level q = round(v/s)
the gradient ``q - v/s`` inside the range and the clipped level (``-Qn`` / ``Qp``) outside
(``GridCodec.surrogate``). The step's gradient is scaled by ``g = 1/sqrt(N Qp)`` (LSQ §2.2: N weights
share the step, and LSQ+ scales the offset's alike), applied as ``s.detach() + (s g - (s g).detach())``,
whose value is s exactly.

Zero-point formats (``int*_asym``) learn a float offset too (LSQ+, Bhalgat et al., arXiv 2004.09576), stored
as float16 as hqq stores a float zero (docs/formats.md#zero-point-integers); training rounds it to float16
in the forward pass, so what is trained is what is stored.

Formats whose block scales are codes (mxfp*, nvfp4: exponents and fp8 bytes) or GGUF blocks have no step a
gradient can move and are refused.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import InputError
from ..fake_quant import _pieces, fake_quantize, initial_scales
from ..formats.registry import codec_for, get_format, require_grid
from ..formats.spec import FormatSpec
from ..pipeline import zero_code
from ..quantize import quantize
from ..scaling.packing import pack_codes
from ..tensor import QuantizedTensor

INITS = ("mse", "rule", "lsq")  # a searched scale (default), the format's own rule, LSQ's 2 mean|v| / sqrt(Qp)
_TINY = torch.finfo(torch.float32).tiny


def check_learnable(spec: FormatSpec) -> None:
    """A ValueError unless ``spec`` has block scales a gradient can train (float scale parts of a grid)."""
    require_grid(spec, "LSQ trains the scales of a grid format, such as int2..int8, int*_asym, nf2..nf8 or fp4_e2m1")
    parts = initial_scales(torch.ones(1, spec.default_block_size), spec)
    coded = [name for name, t in parts.items() if not name.startswith("tensor_") and name != "zeros"
             and not t.is_floating_point()]
    if coded:
        raise InputError(f"{spec.name} stores its block scales as codes ({', '.join(sorted(set(coded)))}), which a "
                         "gradient cannot move: train int2..int8, int*_asym, nf2..nf8 or fp4_e2m1 instead")


def positive_levels(spec: FormatSpec, parts: dict[str, torch.Tensor]) -> int:
    """LSQ's Qp: the levels above zero (2^b - 1 for an unsigned zero-point code range, as LSQ+)."""
    codec = codec_for(spec)
    if "zeros" in parts:
        return 2**spec.bits - 1
    levels = codec.levels(spec, parts)[0]
    return max(1, int((levels[torch.isfinite(levels)] > 0).sum()))


class LSQQuantizer(nn.Module):
    """The learned scale parts of one weight and its fake quantization (module docstring).

    ``weight``: the weight to initialize from. ``init``: ``"mse"`` (the searched clipping of
    ``lowbit.search``, weighed by w^2, the default), ``"rule"`` (the format's own absmax/min-max) or
    ``"lsq"`` (the paper's ``2 mean|v| / sqrt(Qp)`` per block, symmetric integers only). ``start``: a
    quantized weight whose scale parts to start from instead (GPTQ's), ``init`` then unused.
    """

    def __init__(self, weight: torch.Tensor, fmt: str | FormatSpec, block_size: int | None = None,
                 init: str = "mse", start: QuantizedTensor | None = None):
        super().__init__()
        spec = get_format(fmt)
        check_learnable(spec)
        if init not in INITS:
            raise InputError(f"unknown init {init!r}: use one of {', '.join(INITS)}")
        self.spec, self.block = spec, block_size or spec.default_block_size
        w = weight.detach()
        if start is not None:  # e.g. GPTQ's rounding: its scale parts, without double quantization
            if start.format != spec or start.block_size != self.block or start.double_quant:
                raise InputError(f"a start of {start.format.name}/{start.block_size}"
                                 f"{'+dq' if start.double_quant else ''} cannot seed {spec.name}/{self.block}")
            parts = {name: t for name, t in start.parts.items() if name != "codes"}
        else:
            parts = self._initial(w, init)
        self.qp = positive_levels(spec, parts)
        # LSQ §2.2: the step's gradient scaled by 1/sqrt(N Qp), N the weights that share it
        self.grad_scale = 1.0 / math.sqrt(min(self.block, w.numel()) * self.qp)
        # clones: a start made under inference mode (GPTQ's) holds inference tensors, which cannot be trained
        self.scale = nn.Parameter(parts.pop("scales").float().clone())
        zeros = parts.pop("zeros", None)
        self.zero = None if zeros is None else nn.Parameter(zeros.float().clone())
        for name, t in parts.items():  # per-tensor constants (a learned codebook): fixed
            self.register_buffer(name, t)
        self._fixed = list(parts)

    def _initial(self, w: torch.Tensor, init: str) -> dict[str, torch.Tensor]:
        if init == "rule":
            return initial_scales(w, self.spec, block_size=self.block)
        if init == "lsq":
            if self.spec.family != "int":
                raise InputError(f"init 'lsq' (2 mean|v| / sqrt(Qp)) is for symmetric integers; {self.spec.name}: "
                                 "use init 'mse' or 'rule'")
            qp = 2 ** (self.spec.bits - 1) - 1
            flat = w.reshape(-1).float()
            steps = [blocks.abs().mean(1) * 2 / math.sqrt(qp) for blocks, _, _ in _pieces(flat, self.block, {})]
            return {"scales": torch.cat(steps)}
        search = "hqq" if codec_for(self.spec).family == "int_asym" else "mse"  # hqq's float zero: LSQ+'s offset
        q = quantize(w, self.spec, block_size=self.block, search=search)
        return {name: t for name, t in q.parts.items() if name != "codes"}

    def parts(self) -> dict[str, torch.Tensor]:
        """The scale parts the forward pass uses: the step, kept positive, and the zero rounded to float16,
        each with the gradient scaled by ``grad_scale`` and the value exactly what ``stored_parts`` stores."""
        g = self.grad_scale
        out = {name: getattr(self, name) for name in self._fixed}
        out["scales"] = (self.scale.detach() + (self.scale * g - (self.scale * g).detach())).clamp(min=_TINY)
        if self.zero is not None:
            out["zeros"] = self.zero.detach().half().float() + (self.zero * g - (self.zero * g).detach())
        return out

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return fake_quantize(weight, self.spec, self.parts(), block_size=self.block)

    def stored_parts(self) -> dict[str, torch.Tensor]:
        """The scale parts as ``convert`` stores them: fp32 steps, a float16 zero."""
        out = {name: getattr(self, name).detach() for name in self._fixed}
        out["scales"] = self.scale.detach().float().clamp(min=_TINY)
        if self.zero is not None:
            out["zeros"] = self.zero.detach().half()
        return out

    @torch.no_grad()
    def convert(self, weight: torch.Tensor) -> QuantizedTensor:
        """``weight`` stored with the learned scales: its ``dequantize()`` is this quantizer's forward, bit for bit."""
        codec, parts = codec_for(self.spec), self.stored_parts()
        flat = weight.detach().reshape(-1).to(torch.float32)
        codes = [codec.encode(self.spec, blocks, p, partial=partial).reshape(-1)
                 for blocks, p, partial in _pieces(flat, self.block, parts)]
        packed = pack_codes(torch.cat(codes), self.spec.bits, pad_code=zero_code(self.spec))
        tensor = {k: v for k, v in parts.items() if k.startswith("tensor_")}
        block = {k: v for k, v in parts.items() if not k.startswith("tensor_")}
        return QuantizedTensor(format=self.spec, shape=weight.shape, dtype=weight.dtype, block_size=self.block,
                               parts={**tensor, "codes": packed, **block}, double_quant=False)
