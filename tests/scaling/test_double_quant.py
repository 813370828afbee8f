"""Double quantization against bitsandbytes' native CPU kernel, code for code (docs/formats.md#double-quantization).

bitsandbytes 0.50 quantizes the nested 8-bit absmax with cquantize_blockwise_cpu_fp32, whose
code is that of the nearest point on a 65536-point grid, not of the value itself; lowbit's
compress must write the same codes, second-level absmax and offset.
"""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch

import lowbit
from lowbit.scaling.double_quant import DQ_BLOCK, LUT_SIZE, _code_of_grid_point, compress, decompress, dynamic_map

BNB_TYPE = {"nf4": "nf4", "bnb_fp4": "fp4"}
BLOCKS = [32, 64, 128, 256, 512, 1024, 2048, 4096]
# 1,029 first-level blocks: >= 1,000 blocks, and 1029 % 256 = 5 leaves a partial
# second-level block; 14 elements short of the last block leave a partial first-level
# block too. Lengths stay even: for odd ones bnb's CPU dequantize_4bit falls back to a
# torch.compile'd path that recompiles per shape (seconds each).
N_BLOCKS = 1029


def assert_codes_equal(ours: torch.Tensor, ref: torch.Tensor, what: str):
    """Exact equality; on failure, name the differing 256-code second-level blocks."""
    assert ours.shape == ref.shape and ours.dtype == ref.dtype, f"{what}: {ours.shape} {ours.dtype} vs {ref.shape}"
    if torch.equal(ours, ref):
        return
    diff = (ours != ref).nonzero().flatten()
    blocks = sorted(set((diff // DQ_BLOCK).tolist()))
    first = [(i, int(ours[i]), int(ref[i])) for i in diff[:5].tolist()]
    raise AssertionError(
        f"{what}: {diff.numel()} of {ref.numel()} codes differ in second-level blocks {blocks[:20]}; "
        f"(index, lowbit, bnb): {first}"
    )


def assert_bits_equal(ours: torch.Tensor, ref: torch.Tensor, what: str):
    ours, ref = ours.reshape(-1), ref.reshape(-1)
    assert ours.dtype == ref.dtype == torch.float32, what
    diff = (ours.view(torch.int32) != ref.view(torch.int32)).nonzero().flatten()
    assert diff.numel() == 0, f"{what}: {diff.numel()} values differ, first at {diff[:5].tolist()}"


def assert_values_equal(ours: torch.Tensor, ref: torch.Tensor, what: str):
    """Bitwise, except that +0 == -0: bnb's native CPU fp4 decoder writes code 8 as -0.0 where
    its table (and lowbit) hold +0.0."""
    ours, ref = ours.reshape(-1), ref.reshape(-1)
    nz = ref != 0
    assert torch.equal(ours == 0, ~nz), f"{what}: zeros differ"
    assert_bits_equal(ours[nz], ref[nz], what)


def weights(n: int, seed: int) -> torch.Tensor:
    """Standard normal for even seeds; heavy-tailed (Student t, 2 dof) for odd ones, whose
    outliers spread the first-level absmax far from their mean."""
    g = torch.Generator().manual_seed(seed)
    if seed % 2 == 0:
        return torch.randn(n, generator=g)
    return torch.distributions.StudentT(2.0).sample((n,)) * torch.rand(n, generator=g)


def check_against_quantize_4bit(x: torch.Tensor, fmt: str, block: int, what: str):
    flat = x.reshape(-1)
    # flat for bnb: its CPU dequantize kernel restarts blocks per row of a 2-D shape
    # (tests/formats/test_bnb_reference.py::test_bnb_cpu_kernel_blocks_per_row).
    packed, state = F.quantize_4bit(flat, blocksize=block, quant_type=BNB_TYPE[fmt], compress_statistics=True)
    q = lowbit.quantize(x, fmt, block_size=block, double_quant=True)
    assert torch.equal(q.parts["codes"], packed.reshape(-1)), f"{what}: 4-bit codes differ"
    assert_codes_equal(q.parts["scales_q"], state.absmax, f"{what}: scales_q")
    assert_bits_equal(q.parts["scales_absmax"], state.state2.absmax, f"{what}: scales_absmax")
    assert_bits_equal(q.parts["scales_offset"], state.offset.reshape(1), f"{what}: scales_offset")
    assert_values_equal(q.dequantize(), F.dequantize_4bit(packed, state), f"{what}: dequantized")


@pytest.mark.parametrize("fmt", ["nf4", "bnb_fp4"])
@pytest.mark.parametrize("block", BLOCKS)
def test_parts_match_bitsandbytes(fmt, block):
    seeds = (0, 1, 2) if block <= 512 else (block,)  # several seeds where they are cheap
    for seed in seeds:
        x = weights(N_BLOCKS * block - 14, seed)
        check_against_quantize_4bit(x, fmt, block, f"{fmt} block {block} seed {seed}")


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["nf4", "bnb_fp4"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("seed", range(10, 14))
def test_parts_match_bitsandbytes_sweep(fmt, block, seed):
    # About 2M weights and >= 1,000 blocks a case; + 7 * seed (70..91) keeps the second-level
    # block count off a multiple of 256.
    n_blocks = max(2**21 // block, 1000) + 7 * seed
    x = weights(n_blocks * block, seed)
    check_against_quantize_4bit(x, fmt, block, f"{fmt} block {block} seed {seed}")


def test_reproducer_1000x77():
    # 2 of 1,204 codes were off by one before the grid rule (nearest-value rounding).
    x = torch.randn(1000, 77, generator=torch.Generator().manual_seed(20261122))
    check_against_quantize_4bit(x, "nf4", 64, "1000x77")


@pytest.mark.slow
def test_reproducer_4096x4096():
    # 479 of 262,144 codes were off by one before the grid rule.
    x = torch.randn(4096, 4096, generator=torch.Generator().manual_seed(0))
    check_against_quantize_4bit(x, "nf4", 64, "4096x4096")


def test_grid_codes_match_kernel():
    """Every grid point, fed to bitsandbytes as itself (absmax 1), takes the code lowbit
    assigns to it; so do values 1 and 2 ulps either side of every midpoint, where the grid
    rule and nearest-value rounding part ways."""
    grid = torch.arange(LUT_SIZE, dtype=torch.float32) * 2 / torch.full((LUT_SIZE,), LUT_SIZE - 1.0) - 1
    code = dynamic_map()
    mids = (code[:-1] + code[1:]) / 2
    up1, down1 = torch.nextafter(mids, torch.tensor(2.0)), torch.nextafter(mids, torch.tensor(-2.0))
    up2, down2 = torch.nextafter(up1, torch.tensor(2.0)), torch.nextafter(down1, torch.tensor(-2.0))
    values = torch.cat([grid, mids, up1, up2, down1, down2])
    values = torch.cat([values, torch.zeros(-values.numel() % (DQ_BLOCK - 1))])  # whole rows
    # Rows of 255 values plus a 1 that pins each block's absmax to 1, so x / absmax is x.
    rows = values.view(-1, DQ_BLOCK - 1)  # (n, 255)
    x = torch.cat([rows, torch.ones(rows.shape[0], 1)], dim=1).reshape(-1)  # (n * 256,)
    q_bnb, state = F.quantize_blockwise(x, blocksize=DQ_BLOCK)
    assert (state.absmax == 1).all()
    assert torch.equal(q_bnb.view(-1, DQ_BLOCK)[:, :-1].reshape(-1)[:LUT_SIZE], _code_of_grid_point())
    parts = compress(x)
    # compress subtracts the mean; quantize the same deviations with bitsandbytes.
    centred = x - x.mean()
    ref, ref_state = F.quantize_blockwise(centred, blocksize=DQ_BLOCK)
    assert_codes_equal(parts["scales_q"], ref, "grid and midpoint neighbours")
    assert_bits_equal(parts["scales_absmax"], ref_state.absmax, "absmax")


def test_rule_is_not_nearest():
    """The kernel's code is sometimes one off the nearest code (its grid spacing 2/65535 is
    coarser than the map near 0); lowbit follows the kernel."""
    x = torch.randn(800 * DQ_BLOCK, generator=torch.Generator().manual_seed(3)) * 1e-2
    x[::DQ_BLOCK] = 1.0  # absmax 1 in every block, so scaled values stay small and dense
    parts = compress(x)
    ref, _ = F.quantize_blockwise(x - x.mean(), blocksize=DQ_BLOCK)
    assert_codes_equal(parts["scales_q"], ref, "small values")
    scaled = (x - x.mean()).reshape(-1, DQ_BLOCK)
    scaled = (scaled / scaled.abs().amax(dim=1, keepdim=True)).reshape(-1)
    code = dynamic_map()
    nearest = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)  # ties to lower
    assert (nearest != ref).sum() > 0


@pytest.mark.parametrize("n", [1, 255, 256, 257, 1000, 3 * 256])
def test_compress_matches_quantize_blockwise(n):
    """compress on its own, any length: full and partial second-level blocks."""
    g = torch.Generator().manual_seed(n)
    scales = torch.rand(n, generator=g) * torch.rand(n, generator=g) ** 4
    parts = compress(scales)
    offset = scales.mean()
    ref, state = F.quantize_blockwise(scales - offset, blocksize=DQ_BLOCK)
    assert_codes_equal(parts["scales_q"], ref, f"n={n}")
    assert_bits_equal(parts["scales_absmax"], state.absmax, f"n={n} absmax")
    assert_bits_equal(decompress(parts), F.dequantize_blockwise(ref, state) + offset, f"n={n} decoded")


def test_all_zero_block():
    """A 256-block whose deviations are all 0 (every scale equal to the mean): bitsandbytes
    writes code 0 with absmax 0; decoding still gives the scale back."""
    scales = torch.full((600,), 0.25)
    scales[512:] = torch.linspace(0.1, 0.4, 88)  # the last, partial block is not constant
    scales[512:] += 0.25 - scales.mean()  # keep the mean at exactly 0.25 ...
    assert scales.mean().item() == 0.25  # ... so the first two blocks are all-zero deviations
    parts = compress(scales)
    ref, state = F.quantize_blockwise(scales - scales.mean(), blocksize=DQ_BLOCK)
    assert (state.absmax[:2] == 0).all() and (ref[:512] == 0).all()
    assert_codes_equal(parts["scales_q"], ref, "zero blocks")
    assert torch.equal(decompress(parts)[:512], scales[:512])
