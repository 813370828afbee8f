"""Differentiable fake quantization on the grid pipeline's own encode and decode.

``fake_quantize(x, fmt, scales)`` returns exactly ``quantize(...).dequantize()`` for those
scales (the forward runs the codec's ``encode`` then ``decode``, nothing else), so training
and post-training quantization cannot drift apart. The backward pass is the straight-through
estimator of LSQ (Esser et al. 2020, arXiv 1902.08153): the gradient reaches ``x`` inside
the grid's range and every floating-point scale part (``GridCodec.surrogate`` says how).
"""

from __future__ import annotations

import torch

from .formats.registry import GridCodec, codec_for, get_format
from .formats.spec import FormatSpec
from .pipeline import quantize_flat

Parts = dict[str, torch.Tensor]


def initial_scales(x: torch.Tensor, fmt: str | FormatSpec, *, block_size: int | None = None) -> Parts:
    """The scale parts the format's own rule gives ``x`` (per-block ones on dim 0, full blocks
    then the trailing partial one), as fp32 leaves a training loop can make trainable."""
    spec = get_format(fmt)
    block = block_size or spec.default_block_size
    parts = quantize_flat(spec, x.detach().reshape(-1).to(torch.float32), block)
    return {name: t for name, t in parts.items() if name != "codes"}


def fake_quantize(x: torch.Tensor, fmt: str | FormatSpec, scales: Parts, *, block_size: int | None = None):
    """``x`` rounded to ``fmt``'s grid with ``scales`` and decoded, in ``x``'s shape and dtype."""
    spec = get_format(fmt)
    codec = codec_for(spec)
    if not issubclass(codec, GridCodec):
        raise ValueError(f"fake_quantize needs a grid format; {spec.name} is a GGUF block format")
    block = block_size or spec.default_block_size
    names = sorted(scales)
    return _FakeQuantize.apply(x, spec, block, names, *(scales[n] for n in names))


def _pieces(flat: torch.Tensor, block: int, scales: Parts):
    """(blocks, their scale parts, partial) for the full blocks and the trailing partial one."""
    n_full = flat.numel() // block
    tensor = {k: v for k, v in scales.items() if k.startswith("tensor_")}
    per_block = {k: v for k, v in scales.items() if not k.startswith("tensor_")}
    yield flat[: n_full * block].view(n_full, block), {**tensor, **{k: v[:n_full] for k, v in per_block.items()}}, False
    if flat.numel() > n_full * block:
        yield flat[n_full * block :].view(1, -1), {**tensor, **{k: v[n_full:] for k, v in per_block.items()}}, True


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, block, names, *tensors):
        codec = codec_for(spec)
        scales = dict(zip(names, (t.detach() for t in tensors), strict=True))
        flat = x.detach().reshape(-1).to(torch.float32)
        out, codes = [], []
        for blocks, parts, partial in _pieces(flat, block, scales):
            c = codec.encode(spec, blocks, parts, partial=partial)
            codes.append(c)
            out.append(codec.decode(spec, c, parts).reshape(-1))
        ctx.save_for_backward(x, *tensors)
        ctx.spec, ctx.block, ctx.names, ctx.codes = spec, block, names, codes
        return torch.cat(out).to(x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        x, *tensors = ctx.saved_tensors
        codec = codec_for(ctx.spec)
        with torch.enable_grad():
            xv = x.detach().to(torch.float32).requires_grad_(ctx.needs_input_grad[0])
            leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in tensors]
            scales = dict(zip(ctx.names, leaves, strict=True))
            flat = xv.reshape(-1)
            out = [codec.surrogate(ctx.spec, blocks, c, parts).reshape(-1)
                   for (blocks, parts, _), c in zip(_pieces(flat, ctx.block, scales), ctx.codes, strict=True)]
            wanted = [t for t in (xv, *leaves) if t.requires_grad]
            grads = iter(torch.autograd.grad(torch.cat(out), wanted, grad.reshape(-1).to(torch.float32),
                                             allow_unused=True) if wanted else ())
        gx = next(grads) if xv.requires_grad else None
        gs = [next(grads) if t.requires_grad else None for t in leaves]
        gx = gx.to(x.dtype).reshape(x.shape) if gx is not None else None
        return (gx, None, None, None, *gs)
