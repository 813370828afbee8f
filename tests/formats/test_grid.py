"""Error bounds for the absmax-scaled families: exact on the grid, within half a step off it."""

import pytest
import torch

import lowbit

FORMATS = [f"int{b}" for b in range(2, 9)] + [f"nf{b}" for b in range(2, 9)] + ["bnb_fp4"]


def block_grid(fmt: str, scale: torch.Tensor) -> torch.Tensor:
    """(n_blocks, n_values) sorted grid of each block."""
    values = torch.tensor(sorted(set(lowbit.get_format(fmt).values)))
    return scale[:, None] * values[None, :]


@pytest.mark.parametrize("fmt", FORMATS)
def test_representable_values_roundtrip_exactly(fmt):
    values = torch.tensor(lowbit.get_format(fmt).values)  # max |value| is 1 or Qp: exact scales
    for scale in (1.0, 2.0**-7, 2.0**5):
        x = values * scale
        q = lowbit.quantize(x, fmt, block_size=x.numel())
        assert (q.dequantize() == x).all(), fmt


@pytest.mark.parametrize("fmt", FORMATS)
def test_error_is_at_most_half_a_step(fmt):
    torch.manual_seed(0)
    x = torch.randn(64, 64) * torch.rand(64, 1) * 10
    q = lowbit.quantize(x, fmt, block_size=64)
    out = q.dequantize().reshape(-1, 64)
    grid = block_grid(fmt, q.parts["scales"])  # (blocks, values)
    nearest = (x.reshape(-1, 64)[:, :, None] - grid[:, None, :]).abs().amin(dim=2)
    err = (out - x.reshape(-1, 64)).abs()
    # the chosen value is the nearest grid point (up to float32 rounding of the scaling)
    assert (err <= nearest + 1e-6 * x.abs().max()).all()
    gaps = (grid[:, 1:] - grid[:, :-1]).amax(dim=1, keepdim=True)
    assert (err <= gaps / 2 * (1 + 1e-5)).all()
