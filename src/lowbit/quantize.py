"""lowbit.quantize: one tensor in, one QuantizedTensor out."""

from __future__ import annotations

import torch

from . import dispatch
from .checks import check_block_overhead, check_block_size, check_float_tensor
from .errors import InputError
from .formats.registry import get_format
from .formats.spec import FormatSpec, fixed_block_message, no_double_quant_message
from .pipeline import check_search, encode_parts, needs_calibration
from .representable import check_representable
from .scaling import double_quant as dq
from .tensor import QuantizedTensor


def quantize(
    x: torch.Tensor,
    fmt: str | FormatSpec,
    *,
    block_size: int | None = None,
    double_quant: bool = False,
    allow_nonfinite: bool = False,
    search: str | None = None,
    importance: torch.Tensor | None = None,
    kernels: str | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` (float32/float16/bfloat16, any shape) to ``fmt``.

    Blocks run over the flattened tensor; a trailing partial block gets its own scale.
    GGUF formats need every row (last dim) to hold whole blocks. ``double_quant``
    compresses the per-block fp32 scales bitsandbytes-style (docs/formats.md#double-quantization).
    NaN or Inf raise InputError unless ``allow_nonfinite`` (results are then undefined).

    Finite input the format cannot hold raises ``UnrepresentableError`` (a ValueError)
    naming the first block whose stored scale or dequantized value (in ``x.dtype``) would
    overflow, and the format's largest magnitude for that dtype; ``allow_nonfinite`` skips
    this check too. A block size that stores more bits per weight than ``x.dtype`` has
    warns with ``LowbitWarning``.

    ``search`` chooses the block scales instead of the format's rule (docs/formats.md#scale-search):
    ``"mse"`` / ``"hqq"``, or ``"amse"`` / ``"ahqq"``, which weight each element's squared error
    by ``importance``: nonnegative, broadcastable to ``x`` (per input channel: shape
    ``(x.shape[-1],)``, the mean squared activation each weight multiplies). The stored layout
    is the format's own. ``kernels``: "native" or "reference" for this call (``lowbit.dispatch``).
    """
    spec = get_format(fmt)
    check_float_tensor(x, allow_nonfinite=allow_nonfinite)
    block = spec.default_block_size if block_size is None else block_size
    check_block_size(block)
    if spec.fixed_block_size and block != spec.default_block_size:
        raise InputError(fixed_block_message(spec, block))
    if spec.row_blocks and x.numel() and (x.dim() == 0 or x.shape[-1] % block):
        row = x.shape[-1] if x.dim() else 1
        raise InputError(
            f"{spec.name} needs each row to hold whole blocks of {block}; the last dimension is {row}"
        )
    if double_quant and not spec.double_quant:
        raise InputError(no_double_quant_message(spec))

    check_block_overhead(spec, block, x.dtype, double_quant=double_quant)
    weights = _search_weights(spec, x, search, importance) if search is not None else None
    if search is not None:
        search = check_search(spec, search)

    flat = x.detach().reshape(-1).to(torch.float32)
    with dispatch.use(kernels):
        parts = encode_parts(spec, flat, block, search=search, weights=weights) if x.numel() else {}
    check = not allow_nonfinite and bool(parts)  # non-finite input: results are undefined anyway
    if check:
        check_representable(spec, parts, flat, shape=x.shape, dtype=x.dtype, block=block)
    if double_quant and parts:
        compressed = dq.compress(parts["scales"])
        if check:
            # compressed scales can overflow where the format's own do not (their float32 mean)
            view = {**parts, "scales": dq.decompress(compressed)}
            check_representable(spec, view, flat, shape=x.shape, dtype=x.dtype, block=block, double_quant=True)
        del parts["scales"]
        parts.update(compressed)
    return QuantizedTensor(
        format=spec, shape=x.shape, dtype=x.dtype, block_size=block, parts=parts, double_quant=double_quant
    )


def _search_weights(spec: FormatSpec, x: torch.Tensor, search: str, importance) -> torch.Tensor | None:
    """The flat per-element weights a weighted search needs (None for the others)."""
    if not needs_calibration(search):
        if importance is not None:
            raise InputError(f"@{search} does not use importance weights; use @a{search} for the weighted search")
        return None
    if importance is None:
        raise InputError(f"@{search} weighs the error by calibration activations and got none: pass importance= "
                         f"(the commands collect it with --calibrate), or use @{search[1:]}")
    imp = torch.as_tensor(importance, dtype=torch.float32)
    if not bool(torch.isfinite(imp).all()) or bool((imp < 0).any()):
        raise InputError(f"@{search}: importance weights must be finite and nonnegative")
    try:
        return imp.expand(x.shape).reshape(-1)
    except RuntimeError:
        raise InputError(f"@{search}: importance of shape {tuple(imp.shape)} does not broadcast to the tensor's "
                         f"shape {tuple(x.shape)} (per input channel: ({x.shape[-1] if x.dim() else 1},))") from None
