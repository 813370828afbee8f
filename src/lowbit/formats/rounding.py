"""Round scaled values to the nearest entry of a sorted value table."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def midpoints(sorted_values: torch.Tensor) -> torch.Tensor:
    """float32 midpoints between neighbours, computed as bitsandbytes does: (a + b) / 2."""
    return (sorted_values[:-1] + sorted_values[1:]) / 2


def nearest_ties_lower(scaled: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index into the sorted table; a value on a midpoint takes the LOWER entry
    (docs/formats.md#normalfloat-and-bitsandbytes-fp4).

    torch.bucketize(right=False) returns i with mids[i-1] < x <= mids[i]: ties go low.
    """
    import torch

    return torch.bucketize(scaled, mids, out_int32=True)


def nearest_ties_even(scaled: torch.Tensor, sorted_values: torch.Tensor, mids: torch.Tensor) -> torch.Tensor:
    """Index into the sorted table; a value on a midpoint takes the entry with an even index.

    For a minifloat table sorted by magnitude the index's low bit is the encoding's low bit,
    so this is IEEE round-half-to-even (what ml_dtypes' casts do).
    """
    import torch

    idx = torch.bucketize(scaled, mids, out_int32=True)
    on_mid = idx < mids.numel()
    tie = on_mid & (scaled == mids[idx.clamp(max=mids.numel() - 1)]) & (idx % 2 == 1)
    return torch.where(tie, idx + 1, idx)
