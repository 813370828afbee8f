"""Split a flat tensor into blocks: full blocks plus one trailing partial block.

bitsandbytes gives a trailing partial block its own scale over only its real
elements (docs/formats.md#block-handling), so the tail is kept as its own (1, rem) block rather than
padded: padding would change a block's min, max or mean.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def split_blocks(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """flat: (n,) -> (full (n // block, block), tail (1, n % block) or None)."""
    n = flat.numel()
    full = n - n % block
    head = flat[:full].view(-1, block)
    tail = flat[full:].view(1, -1) if full < n else None
    return head, tail


def block_absmax(blocks: torch.Tensor) -> torch.Tensor:
    """(n_blocks, block) -> (n_blocks,) float32 max |x|."""
    return blocks.abs().amax(dim=1)
