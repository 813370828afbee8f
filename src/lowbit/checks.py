"""Input checks shared by every entry point."""

from __future__ import annotations

import torch

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
        raise ValueError(
            f"input holds {x.reshape(-1)[flat].item()} at index {index}; "
            "quantization needs finite values (pass allow_nonfinite=True to quantize anyway)"
        )


def check_block_size(block: int) -> None:
    if not isinstance(block, int) or isinstance(block, bool) or block <= 0:
        raise ValueError(f"block_size must be a positive integer, got {block!r}")
