"""Input checks shared by every entry point."""

from __future__ import annotations

import warnings
from functools import cache

import torch

from .errors import InputError, LowbitWarning
from .formats.registry import codec_for
from .formats.spec import DQ_BLOCK, FormatSpec
from .limits import check_block_size as check_block_size  # re-exported: it moved to limits (no torch there)

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def check_float_tensor(x: torch.Tensor, *, allow_nonfinite: bool = False) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        names = ", ".join(str(d).removeprefix("torch.") for d in FLOAT_DTYPES)
        raise TypeError(f"expected a floating tensor ({names}), got {x.dtype}")
    if allow_nonfinite or x.numel() == 0:
        return
    # A finite sum proves every element finite (NaN and Inf propagate); it is one fast
    # read of x. Only a non-finite sum (or overflow) pays for the element-wise check.
    if bool(torch.isfinite(x.sum(dtype=torch.float32))):
        return
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        flat = int((~finite).reshape(-1).nonzero()[0])
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), x.shape))
        raise InputError(
            f"input holds {x.reshape(-1)[flat].item()} at index {index}; "
            "quantization needs finite values (pass allow_nonfinite=True to quantize anyway)"
        )


def check_block_overhead(spec: FormatSpec, block: int, dtype: torch.dtype, *, double_quant: bool = False) -> None:
    """Warn (LowbitWarning) when a block this small stores more bits per weight than the input has."""
    bits = block_bits_per_weight(spec, block, double_quant)
    input_bits = torch.finfo(dtype).bits
    if bits > input_bits:
        warnings.warn(
            f"{spec.name} with block_size={block} stores {bits:g} bits per weight, more than the {input_bits} "
            f"bits of its {str(dtype).removeprefix('torch.')} input; a larger block stores fewer",
            LowbitWarning,
            stacklevel=3,  # the caller of lowbit.quantize
        )


@cache
def block_bits_per_weight(spec: FormatSpec, block: int, double_quant: bool = False) -> float:
    """Bits stored per weight by full blocks of ``block``: codes plus per-block scales (per-tensor
    constants, which vanish on a large tensor, are not counted). Reads the part sizes off one
    encoded block of zeros, so it holds for every codec."""
    # per-block parts do not grow with the block (codes, counted apart, do); GGUF's
    # "data" part holds the codes too, so a fixed-size block is encoded at its real size
    b = block if spec.fixed_block_size else 1
    codec = codec_for(spec)
    zeros = torch.zeros(b, dtype=torch.float32)
    tensor_parts = codec.tensor_parts(spec, zeros, b)
    parts = codec.quantize_blocks(spec, zeros.view(1, b), partial=False, tensor_parts=tensor_parts)
    bits = 0.0
    for name, t in parts.items():
        if name == "codes":
            bits += spec.bits * block
        elif name == "scales" and double_quant:
            # QLoRA double quant (arXiv 2305.14314 §3): one 8-bit code per scale, one fp32 per DQ_BLOCK scales
            bits += 8 + 32 / DQ_BLOCK
        else:
            bits += 8 * t.numel() * t.element_size()
    return bits / block
