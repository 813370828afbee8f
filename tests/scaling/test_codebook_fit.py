"""Quantile and Lloyd–Max codebook fitting (lowbit.scaling.codebook_fit).

References: numpy's ``quantile(method="linear")`` for the empirical quantiles; hand-worked
small vectors; Max (1960, "Quantizing for minimum distortion", Table I) for the optimal
Gaussian quantizers; a plain-Python Lloyd loop; lowbit.formats.rounding for the nearest rule;
bitsandbytes' NF4 table (lowbit.formats.codebooks.normal_float_values) for the comparison.
"""

from __future__ import annotations

from itertools import pairwise

import numpy as np
import pytest
import torch

from lowbit.formats.codebooks import normal_float_values
from lowbit.formats.rounding import midpoints, nearest_ties_lower
from lowbit.scaling.codebook_fit import (
    DEFAULT_SAMPLE,
    lloyd_iterates,
    lloyd_levels,
    nearest,
    quantile_error,
    quantile_levels,
    quantize_mse,
)


def block_normalised(n: int, seed: int = 0, block: int = 64) -> torch.Tensor:
    """Gaussian weights divided by their 64-block's absmax, as the learned codecs fit them."""
    w = torch.randn(n, generator=torch.Generator().manual_seed(seed)).view(-1, block)
    return (w / w.abs().amax(1, keepdim=True)).flatten()


def numpy_levels(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Midpoints of numpy's linear quantiles at i / 2^k, i = 0..2^k."""
    q = np.quantile(values.double().numpy(), np.arange((1 << bits) + 1) / (1 << bits), method="linear")
    return torch.from_numpy((q[:-1] + q[1:]) / 2).float()


def assert_valid_table(levels: torch.Tensor, values: torch.Tensor, bits: int):
    assert levels.dtype == torch.float32 and levels.shape == (1 << bits,)
    assert bool(torch.isfinite(levels).all()), levels
    assert bool((levels[1:] >= levels[:-1]).all()), levels
    assert float(levels.min()) >= float(values.min()) and float(levels.max()) <= float(values.max()), levels


# --- nearest ---------------------------------------------------------------------------


def test_nearest_matches_the_codec_rule_and_ties_go_low():
    levels = torch.tensor([-1.0, -0.25, 0.0, 0.5, 1.0])
    # Exactly on the midpoints -0.625, -0.125, 0.25, 0.75: the lower level.
    on_mid = torch.tensor([-0.625, -0.125, 0.25, 0.75])
    assert nearest(on_mid, levels).tolist() == [0, 1, 2, 3]
    assert nearest(torch.tensor([-2.0, -0.6, 0.3, 2.0]), levels).tolist() == [0, 1, 3, 4]
    x = block_normalised(1 << 16)
    idx = nearest(x, levels)
    assert idx.dtype == torch.int64
    assert torch.equal(idx, nearest_ties_lower(x, midpoints(levels)).long())


def test_nearest_refuses_unsorted_levels():
    with pytest.raises(ValueError, match="sorted ascending"):
        nearest(torch.zeros(3), torch.tensor([0.0, 1.0, 0.5]))


# --- quantile levels ---------------------------------------------------------------------


def test_quantile_levels_hand_checked():
    # Sorted: 0, 10, 20, 40 (n = 4, h = p * 3). bits=1: p = 0, 1/2, 1 -> h = 0, 1.5, 3
    # -> Q = 0, 15, 40 -> levels 7.5, 27.5. bits=2: h = 0, .75, 1.5, 2.25, 3 -> Q = 0, 7.5,
    # 15, 25, 40 -> levels 3.75, 11.25, 20, 32.5.
    v = torch.tensor([40.0, 0.0, 20.0, 10.0])
    assert quantile_levels(v, 1).tolist() == [7.5, 27.5]
    assert quantile_levels(v, 2).tolist() == [3.75, 11.25, 20.0, 32.5]
    # 0..8: the quantiles at i/4 are the order statistics 0, 2, 4, 6, 8.
    assert quantile_levels(torch.arange(9.0).flip(0), 2).tolist() == [1.0, 3.0, 5.0, 7.0]


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantile_levels_match_numpy_linear_quantiles(bits):
    for x in (block_normalised(1 << 14, seed=bits), torch.randn(1001, generator=torch.Generator().manual_seed(3))):
        # Both round the same float64 midpoint to float32 (up to 1e-16 apart): 1 float32 ulp at most.
        torch.testing.assert_close(quantile_levels(x, bits), numpy_levels(x, bits), rtol=0, atol=1.2e-7)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_each_level_bin_holds_an_equal_share(bits):
    """Level i is the midpoint of [Q(i/2^k), Q((i+1)/2^k)]: rebuild those quantiles from the
    levels and the minimum (Q_{i+1} = 2 q_i - Q_i) and count the values at or below each."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(1))
    levels = quantile_levels(x, bits).double()
    edges = [float(x.min())]
    for q in levels.tolist():
        edges.append(2 * q - edges[-1])
    at_or_below = torch.searchsorted(x.double().sort().values, torch.tensor(edges[1:-1]), right=True)
    share = at_or_below.double() / x.numel()
    expected = torch.arange(1, 1 << bits, dtype=torch.float64) / (1 << bits)
    # Linear interpolation puts floor(p(n-1)) + 1 values at or below Q(p): p within 1/n; the
    # float32 rounding of 2^k levels, doubled at each step of the rebuild, moves edges < 1e-4.
    assert float((share - expected).abs().max()) < 2e-4


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uniform_data_cells_hold_equal_shares_and_levels_are_uniform(bits):
    """For a flat density the nearest-level cells are the quantile bins themselves."""
    n = 1 << 20
    x = torch.rand(n, generator=torch.Generator().manual_seed(2)) * 2 - 1
    levels = quantile_levels(x, bits)
    share = torch.bincount(nearest(x, levels), minlength=1 << bits).double() / n
    p = 1 / (1 << bits)
    # Binomial standard deviation of a cell's share, sqrt(p(1-p)/n); 5 of them.
    assert float((share - p).abs().max()) < 5 * (p * (1 - p) / n) ** 0.5
    uniform = -1 + (2 * torch.arange(1 << bits) + 1) / (1 << bits)
    torch.testing.assert_close(levels, uniform, rtol=0, atol=0.004)


def test_sampled_levels_close_to_exact_on_1m_block_normalised_gaussian():
    x = block_normalised(1 << 20)
    err = quantile_error(x, 4, DEFAULT_SAMPLE)
    print(err)
    # This draw: 0.0022 and -0.47%. Over 20 generator seeds the worst were 0.0062 and 1.75%
    # (a quantile from 2^16 draws has standard error <= 0.2% of the weights).
    assert err.sample == DEFAULT_SAMPLE
    assert err.max_abs_diff < 0.01
    assert abs(err.mse_increase) < 0.03
    # Seeded: the same call gives the same table.
    assert torch.equal(quantile_levels(x, 4, sample=4096), quantile_levels(x, 4, sample=4096))
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(quantile_levels(x, 4, sample=4096, generator=g), quantile_levels(x, 4, sample=4096))
    # A sample as large as the tensor is the exact table.
    assert torch.equal(quantile_levels(x, 4, sample=x.numel()), quantile_levels(x, 4))


def test_sampled_inner_levels_close_on_raw_gaussian_end_levels_follow_the_extremes():
    """On unbounded data the end levels sit halfway to the minimum and maximum, which a
    sample does not see: only the inner levels are estimated well."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(4))
    exact, sampled = quantile_levels(x, 4), quantile_levels(x, 4, sample=DEFAULT_SAMPLE)
    inner = (exact - sampled)[1:-1].abs().max()
    print(f"raw N(0,1): inner levels within {float(inner):.4f}, end levels {(exact - sampled)[[0, -1]].tolist()}")
    # Standard error of Q(1/16) from 2^16 draws: sqrt(p(1-p)/N) / density = 0.00095 / 0.124 = 0.008.
    assert float(inner) < 0.03


# --- Lloyd–Max ------------------------------------------------------------------------------


def plain_lloyd(values: list[float], levels: list[float], steps: int) -> list[list[float]]:
    """Textbook Lloyd with Python floats: nearest level (ties low), then each cell's mean."""
    out = []
    for _ in range(steps):
        mids = [np.float32((np.float32(a) + np.float32(b)) / np.float32(2)) for a, b in pairwise(levels)]
        cells = [[] for _ in levels]
        for v in values:
            cells[sum(v > m for m in mids)].append(v)
        assert all(cells), "reference handles no empty cells"
        levels = [float(np.float32(sum(c) / len(c))) for c in cells]
        out.append(levels)
    return out


def test_lloyd_iterates_match_a_plain_python_lloyd():
    x = torch.randn(300, generator=torch.Generator().manual_seed(5))
    ours = list(lloyd_iterates(x, 2, iters=8, tol=0))
    assert torch.equal(ours[0], quantile_levels(x, 2))
    ref = plain_lloyd(x.tolist(), ours[0].tolist(), len(ours) - 1)
    for step, (a, b) in enumerate(zip(ours[1:], ref, strict=True)):
        torch.testing.assert_close(a, torch.tensor(b), rtol=0, atol=1.2e-7, msg=f"iteration {step + 1}")


@pytest.mark.parametrize(
    ("bits", "max_levels"),
    [(1, [0.7980]), (2, [0.4528, 1.510]), (3, [0.2451, 0.7560, 1.344, 2.152])],
)
def test_lloyd_reaches_max_1960_gaussian_quantizers(bits, max_levels):
    """Max (1960) Table I, N(0,1): positive output levels of the MSE-optimal quantizer, the only
    Lloyd fixed point for a log-concave density (Fleischer 1964), so any start reaches it."""
    x = torch.randn(1 << 20, generator=torch.Generator().manual_seed(6))
    levels = lloyd_levels(x, bits)
    expected = torch.tensor([-v for v in reversed(max_levels)] + max_levels)
    # Sampling error of a cell mean: the outermost 8-level cell (P = 1.3%) has SE ~ 0.004.
    torch.testing.assert_close(levels, expected, rtol=0, atol=0.02)


def test_lloyd_on_uniform_data_gives_uniform_levels():
    x = torch.rand(1 << 20, generator=torch.Generator().manual_seed(8)) * 2 - 1
    levels = lloyd_levels(x, 3)
    torch.testing.assert_close(levels, -1 + (2 * torch.arange(8) + 1) / 8, rtol=0, atol=0.005)


def test_lloyd4_beats_quantile_and_nf4_on_block_normalised_gaussian():
    x = block_normalised(1 << 18)
    mse = {
        "qq4": quantize_mse(x, quantile_levels(x, 4)),
        "nf4": quantize_mse(x, torch.tensor(normal_float_values(4))),
        "lloyd4": quantize_mse(x, lloyd_levels(x, 4)),
    }
    print({k: f"{v:.4e}" for k, v in mse.items()})
    print(
        f"lloyd4 MSE {100 * (1 - mse['lloyd4'] / mse['nf4']):.1f}% below nf4, "
        f"{100 * (1 - mse['lloyd4'] / mse['qq4']):.1f}% below qq4"
    )
    assert mse["lloyd4"] <= mse["qq4"]
    assert mse["lloyd4"] <= mse["nf4"]


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_lloyd_mse_never_increases(bits):
    x = block_normalised(1 << 16, seed=bits)
    mses = [quantize_mse(x, levels) for levels in lloyd_iterates(x, bits, iters=100, tol=0)]
    rises = [(i, a, b) for i, (a, b) in enumerate(pairwise(mses)) if b > a]
    assert not rises, rises[:5]
    assert mses[-1] < mses[0]


def test_empty_cells_are_split_into_the_worst_cell_and_mse_stays_monotone():
    """60% exact zeros: the quantile start has many levels at 0, all but one of them empty."""
    g = torch.Generator().manual_seed(9)
    x = torch.where(torch.rand(1 << 16, generator=g) < 0.6, 0.0, torch.randn(1 << 16, generator=g))
    tables = list(lloyd_iterates(x, 4, iters=200, tol=0))
    assert int((tables[0] == 0).sum()) > 5
    mses = [quantize_mse(x, t) for t in tables]
    assert all(b <= a for a, b in pairwise(mses)), mses
    final = tables[-1]
    assert final.unique().numel() == 16, final
    assert torch.bincount(nearest(x, final), minlength=16).min() > 0, "every level in use"
    assert mses[-1] < 0.5 * mses[0]


def test_weighted_lloyd_equals_lloyd_on_repeated_values():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(4000, generator=g)
    w = torch.randint(1, 4, (4000,), generator=g)
    weighted = lloyd_levels(x, 3, weights=w.float(), tol=0, iters=100)
    repeated = lloyd_levels(x.repeat_interleave(w), 3, init=quantile_levels(x, 3), tol=0, iters=100)
    torch.testing.assert_close(weighted, repeated, rtol=0, atol=1e-6)
    # Zero weights drop values: the same as fitting the rest.
    keep = torch.rand(4000, generator=g) < 0.5
    torch.testing.assert_close(
        lloyd_levels(x, 3, weights=keep.float(), init=quantile_levels(x[keep], 3), tol=0, iters=100),
        lloyd_levels(x[keep], 3, tol=0, iters=100),
        rtol=0,
        atol=1e-6,
    )


def test_lloyd_on_a_sample_and_a_given_init():
    x = block_normalised(1 << 18)
    a = lloyd_levels(x, 4, sample=DEFAULT_SAMPLE)
    assert torch.equal(a, lloyd_levels(x, 4, sample=DEFAULT_SAMPLE))
    assert quantize_mse(x, a) < 1.01 * quantize_mse(x, lloyd_levels(x, 4))
    start = torch.tensor(normal_float_values(4)).flip(0)  # sorted here
    assert torch.equal(next(iter(lloyd_iterates(x, 4, init=start))), start.flip(0))


# --- degenerate inputs ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "values",
    [
        torch.full((1000,), 0.3),
        torch.zeros(7),
        torch.tensor([0.5]),
        torch.tensor([-1.0, 1.0] * 50),
        torch.tensor([-1.0, 1.0, 1.0, 1.0]),
        torch.tensor([-1.0, 0.0, 0.0, 1.0] * 30),
        torch.tensor([1.0, -0.0, 0.0, 2.0, 3.0]),
    ],
    ids=["all-equal", "all-zero", "one-value", "pm1", "pm1-skewed", "three-values", "few-values"],
)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_degenerate_inputs_give_sorted_finite_tables(values, bits):
    for levels in (
        quantile_levels(values, bits),
        quantile_levels(values, bits, sample=3),
        lloyd_levels(values, bits),
        lloyd_levels(values, bits, sample=3),
        lloyd_levels(values, bits, weights=torch.ones_like(values)),
    ):
        assert_valid_table(levels, values, bits)
        assert not bool((levels == 0).logical_and(levels.signbit()).any()), "no -0.0 levels"
    distinct = values.unique()
    lloyd = lloyd_levels(values, bits)
    if distinct.numel() <= 1 << bits:
        assert quantize_mse(values, lloyd) == 0.0, lloyd  # every distinct value gets its own level


# --- input checks -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: quantile_levels(torch.zeros(2, 2), 4), "1-D floating-point"),
        (lambda: quantile_levels(torch.arange(4), 4), "1-D floating-point"),
        (lambda: quantile_levels(torch.zeros(0), 4), "empty"),
        (lambda: quantile_levels(torch.tensor([0.0, float("nan")]), 4), "NaN or inf"),
        (lambda: quantile_levels(torch.zeros(4), 0), "bits must be an int in 1..8"),
        (lambda: quantile_levels(torch.zeros(4), 9), "bits must be an int in 1..8"),
        (lambda: quantile_levels(torch.zeros(4), 4, sample=0), "sample must be a positive int"),
        (lambda: lloyd_levels(torch.zeros(4), 2, weights=torch.tensor([1.0, -1.0, 1.0, 1.0])), "nonnegative"),
        (lambda: lloyd_levels(torch.zeros(4), 2, weights=torch.zeros(4)), "at least one above zero"),
        (lambda: lloyd_levels(torch.zeros(4), 2, weights=torch.ones(3)), "shape"),
        (lambda: lloyd_levels(torch.zeros(4), 2, init=torch.zeros(3)), r"2\^bits = 4 levels"),
        (lambda: lloyd_iterates(torch.zeros(4), 2, iters=-1), "iters must be >= 0"),
    ],
)
def test_bad_input_is_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)
