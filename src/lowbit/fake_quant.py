"""Differentiable fake quantization on the grid pipeline's own encode and decode.

``fake_quantize(x, fmt, scales)`` returns exactly ``quantize(...).dequantize()`` for those
scales (the forward runs the codec's ``encode`` then ``decode``, nothing else), so training
and post-training quantization cannot drift apart. The backward pass is the straight-through
estimator of LSQ (Esser et al. 2020, arXiv 1902.08153): the gradient reaches ``x`` inside
the grid's range and every floating-point scale part (``GridCodec.surrogate`` says how).
"""

from __future__ import annotations

import torch

from .formats.registry import GridCodec, codec_for, get_format, require_grid
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
    require_grid(spec, "fake_quantize needs a grid format")
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


def _closed_form(codec, names: list[str], needs: tuple[bool, ...]) -> bool:
    """Whether the backward pass can use the default surrogate's gradient in closed form: decode is
    ``level[code] * scales`` (GridCodec's own ``surrogate`` and ``multiplier``) and no other part is trained."""
    trained = [n for n, need in zip(names, needs[4:], strict=True) if need]
    return (codec.surrogate.__func__ is GridCodec.surrogate.__func__
            and codec.multiplier.__func__ is GridCodec.multiplier.__func__ and set(trained) <= {"scales"})


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, spec, block, names, *tensors):
        codec = codec_for(spec)
        scales = dict(zip(names, (t.detach() for t in tensors), strict=True))
        flat = x.detach().reshape(-1).to(torch.float32)
        out, codes, slopes, insides = [], [], [], []
        closed = _closed_form(codec, names, ctx.needs_input_grad)
        for blocks, parts, partial in _pieces(flat, block, scales):
            c = codec.encode(spec, blocks, parts, partial=partial)
            out.append(codec.decode(spec, c, parts).reshape(-1))
            if closed:  # GridCodec.surrogate's gradients, kept now: d/dx = inside, d/ds = level - inside * x/s
                levels, lo, hi = codec.levels(spec, parts)
                y = blocks / parts["scales"][:, None]
                inside = (y >= lo) & (y <= hi)
                slopes.append(levels[c.to(torch.int64)] - y * inside)
                insides.append(inside)
            else:
                codes.append(c)
        ctx.closed = closed
        if closed:
            ctx.save_for_backward(*slopes, *insides)
            ctx.pieces, ctx.x_meta = len(slopes), (x.shape, x.dtype)
        else:
            ctx.save_for_backward(x, *tensors)
        ctx.spec, ctx.block, ctx.names, ctx.codes = spec, block, names, codes
        return torch.cat(out).to(x.dtype).reshape(x.shape)

    @staticmethod
    def backward(ctx, grad):
        if ctx.closed:
            return _closed_backward(ctx, grad)
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


def _closed_backward(ctx, grad):
    saved = ctx.saved_tensors
    slopes, insides = saved[: ctx.pieces], saved[ctx.pieces :]
    shape, dtype = ctx.x_meta
    flat = grad.reshape(-1).to(torch.float32)
    g_x, g_s, at = [], [], 0
    for slope, inside in zip(slopes, insides, strict=True):
        g = flat[at : at + slope.numel()].view(slope.shape)
        at += slope.numel()
        g_x.append((g * inside).reshape(-1))
        g_s.append((g * slope).sum(1))
    gx = torch.cat(g_x).to(dtype).reshape(shape) if ctx.needs_input_grad[0] else None
    gs = [torch.cat(g_s) if name == "scales" and need else None
          for name, need in zip(ctx.names, ctx.needs_input_grad[4:], strict=True)]
    return (gx, None, None, None, *gs)
