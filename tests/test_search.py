"""Scale search (lowbit.search): hand-checked clipping, ties, weights; hqq against the hqq package."""

from __future__ import annotations

import hqq.core.optimize as hqq_optimize
import pytest
import torch

from lowbit.search import DEFAULT_RATIOS, check_search_name, hqq_search, mse_search


def sym_grid(blocks: torch.Tensor, bits: int):
    """propose / roundtrip for a symmetric narrow int grid: s = absmax * ratio / qp, q = clamp(round(x / s))."""
    qp = 2 ** (bits - 1) - 1
    amax = blocks.abs().amax(dim=1)

    def propose(ratio):
        return {"scales": amax * ratio / qp}

    def roundtrip(parts):
        s = parts["scales"]
        return torch.round(blocks / s.clamp(min=1e-38)[:, None]).clamp(-qp, qp) * s[:, None]

    return propose, roundtrip


def asym_grid(blocks: torch.Tensor, bits: int):
    """propose / roundtrip for lowbit's zero-point grid, the range [lo, hi] (holding 0) shrunk by the ratio."""
    qmax = 2**bits - 1
    lo, hi = blocks.amin(dim=1).clamp(max=0), blocks.amax(dim=1).clamp(min=0)

    def propose(ratio):
        s = (hi - lo) * ratio / qmax
        z = torch.round(-lo * ratio / s.clamp(min=1e-38)).clamp(0, qmax)
        return {"scales": s, "zeros": z.to(torch.uint8)}

    def roundtrip(parts):
        return asym_roundtrip(blocks, parts["scales"], parts["zeros"].float(), bits)

    return propose, roundtrip


def asym_roundtrip(blocks, s, z, bits):
    """AsymmetricInt's encode + decode, written out: q = clamp(round(x / s) + z, 0, 2^b - 1), (q - z) * s."""
    q = (torch.round(blocks / s.clamp(min=1e-38)[:, None]) + z[:, None]).clamp(0, 2**bits - 1)
    return (q - z[:, None]) * s[:, None]


def hqq_roundtrip(blocks, s, z, bits):
    """AsymmetricInt's encode + decode with a float zero, written out: q = clamp(round(x / s + z)), (q - z) * s."""
    q = torch.round(blocks / s.clamp(min=1e-38)[:, None] + z[:, None]).clamp(0, 2**bits - 1)
    return (q - z[:, None]) * s[:, None]


def block_err(decoded, blocks, weights=None):
    sq = (decoded - blocks) ** 2
    return (sq if weights is None else sq * weights).sum(dim=1)


def data(kind: str, n: int = 4096, block: int = 64, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, block, generator=g)
    if kind == "heavy":  # Student-t with 2 degrees of freedom: outliers set the absmax
        x = x / (torch.randn(n, block, generator=g) ** 2 + torch.randn(n, block, generator=g) ** 2).div(2).sqrt()
    return x


def importance(block: int = 64, seed: int = 1) -> torch.Tensor:
    """A skewed per-input-channel importance (mean squared activation), broadcast over blocks by the caller."""
    return torch.rand(block, generator=torch.Generator().manual_seed(seed)) ** 4 * 10


def test_search_names():
    assert [check_search_name(n) for n in ("mse", "amse", "hqq", "ahqq")] == ["mse", "amse", "hqq", "ahqq"]
    with pytest.raises(ValueError, match=r"^unknown scale search 'gptq'; known: mse, amse, hqq, ahqq$"):
        check_search_name("gptq")


# x = [2, 1, 1, 1, 1] on the ternary grid {-s, 0, s} (int2, qp = 1). Ratio 1: s = 2, each 1 / 2 = 0.5 rounds
# (half to even) to 0: error 4 * 1^2 = 4. Ratio r in (0.5, 1): s = 2r, every element decodes to s: error
# (2 - s)^2 + 4 (1 - s)^2, least at s = 1.2 (r = 0.6): 0.64 + 4 * 0.04 = 0.8.
OUTLIER = torch.tensor([[2.0, 1.0, 1.0, 1.0, 1.0]])


def test_clipping_the_outlier_lowers_the_error():
    propose, roundtrip = sym_grid(OUTLIER, 2)
    assert block_err(roundtrip(propose(torch.ones(1))), OUTLIER).item() == 4.0
    for ratios in (None, [1.0, 0.75, 0.6, 0.5]):  # 0.6 is on the default grid too
        best = mse_search(OUTLIER, propose=propose, roundtrip=roundtrip, ratios=ratios)
        assert best["scales"].item() == pytest.approx(1.2, rel=1e-6)
        assert block_err(roundtrip(best), OUTLIER).item() == pytest.approx(0.8, rel=1e-5)


def test_refit_takes_the_least_squares_scale_of_the_chosen_levels():
    # Ratio 0.75: s = 1.5, all five elements take level 1 (error 0.25 + 4 * 0.25 = 1.25); the least-squares
    # scale of those levels is sum(x) / 5 = 1.2, which re-encodes to the same levels: error 0.8.
    propose, roundtrip = sym_grid(OUTLIER, 2)
    plain = mse_search(OUTLIER, propose=propose, roundtrip=roundtrip, ratios=[1.0, 0.75])
    assert plain["scales"].item() == 1.5
    fitted = mse_search(OUTLIER, propose=propose, roundtrip=roundtrip, ratios=[1.0, 0.75], refit=True)
    assert fitted["scales"].item() == pytest.approx(1.2, rel=1e-6)
    # With importance 1000 on the outlier, keeping it exact (ratio 1, error 4 * 1^2 = 4) beats every clip:
    # ratio 0.6 costs 1000 * 0.8^2, ratio 0.9875 costs 1000 * 0.025^2 + 4 * 0.975^2 = 4.43 ...
    weights = torch.tensor([[1000.0, 1.0, 1.0, 1.0, 1.0]])
    best = mse_search(OUTLIER, propose=propose, roundtrip=roundtrip, weights=weights)
    assert best["scales"].item() == 2.0
    # The refit applies to the winner: ratio 1 keeps the outlier exact on level 1, whose least-squares
    # scale is its own, (1000 * 2 * 1) / (1000 * 1) = 2: nothing moves.
    best = mse_search(OUTLIER, propose=propose, roundtrip=roundtrip, weights=weights, refit=True)
    assert best["scales"].item() == 2.0
    assert block_err(roundtrip(best), OUTLIER, weights).item() == pytest.approx(4.0)


def test_ratio_one_wins_ties():
    blocks = data("normal", n=8, block=16)
    propose, roundtrip = sym_grid(blocks, 4)

    def tagged(ratio):  # every candidate decodes the same: all tie
        return {"scales": propose(torch.ones_like(ratio))["scales"], "ratio": ratio}

    best = mse_search(blocks, propose=tagged, roundtrip=roundtrip, ratios=[0.5, 0.9, 1.0], refit=True)
    assert torch.equal(best["ratio"], torch.ones(8))
    # weights all zero: every candidate's error is 0
    best = mse_search(blocks, propose=propose, roundtrip=roundtrip, weights=torch.zeros_like(blocks))
    assert torch.equal(best["scales"], propose(torch.ones(8))["scales"])


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("grid", [sym_grid, asym_grid])
@pytest.mark.parametrize("weighted", [False, True])
def test_mse_search_never_worse_than_ratio_one(kind, grid, weighted):
    blocks = data(kind, n=1024)
    weights = importance().expand_as(blocks).contiguous() if weighted else None
    propose, roundtrip = grid(blocks, 4)
    rule = block_err(roundtrip(propose(torch.ones(len(blocks)))), blocks, weights)
    errs = []
    for refit in (False, True):
        best = mse_search(blocks, propose=propose, roundtrip=roundtrip, weights=weights, refit=refit)
        assert {k: v.dtype for k, v in best.items()} == {k: v.dtype for k, v in propose(torch.ones(1)).items()}
        err = block_err(roundtrip(best), blocks, weights)
        assert (err <= rule).all()
        errs.append(err.sum())
    assert errs[0] < rule.sum()
    assert errs[1] <= errs[0]  # refit only ever replaces a candidate by a better one


def test_mse_search_is_per_block():
    blocks = data("heavy", n=3000)

    def search(x, refit):
        propose, roundtrip = asym_grid(x, 3)
        return mse_search(x, propose=propose, roundtrip=roundtrip, refit=refit)

    for refit in (False, True):
        whole, head = search(blocks, refit), search(blocks[:1000], refit)
        assert whole.keys() == head.keys() and all(torch.equal(whole[k][:1000], head[k]) for k in head)


def test_mse_search_rejects_bad_input():
    blocks = data("normal", n=4, block=8)
    propose, roundtrip = sym_grid(blocks, 4)
    with pytest.raises(ValueError, match="dim 0 is not n_blocks = 4"):
        mse_search(blocks, propose=lambda r: {"scales": torch.ones(())}, roundtrip=roundtrip)
    with pytest.raises(ValueError, match="refit=True needs a float32"):
        e8m0 = {"e8m0": torch.ones(4, dtype=torch.uint8)}
        mse_search(blocks, propose=lambda r: e8m0, roundtrip=roundtrip, refit=True)
    with pytest.raises(ValueError, match="positive clipping ratios"):
        mse_search(blocks, propose=propose, roundtrip=roundtrip, ratios=[0.5, 0.0])
    with pytest.raises(ValueError, match="2-D float32"):
        mse_search(blocks.double(), propose=propose, roundtrip=roundtrip)
    with pytest.raises(ValueError, match="weights must be float32 of the blocks' shape"):
        mse_search(blocks, propose=propose, roundtrip=roundtrip, weights=torch.ones(8))
    assert 1.0 in DEFAULT_RATIOS and len(set(DEFAULT_RATIOS)) == len(DEFAULT_RATIOS)


@pytest.mark.parametrize("kind", ["normal", "heavy"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("round_start", [False, True])
def test_hqq_zero_matches_the_hqq_package(kind, bits, round_start, monkeypatch):
    blocks = data(kind)
    qmax = 2**bits - 1
    lo, hi = blocks.amin(dim=1).clamp(max=0), blocks.amax(dim=1).clamp(min=0)
    s = (hi - lo) / qmax
    start = torch.round(-lo / s) if round_start else -lo / s  # hqq's round_zero rounds its start the same way
    # hqq's convention: W_q = round(W * scale + zero), scale = 1 / s; its zero is ours. Its default (legacy)
    # solver never multiplies beta by kappa: kappa=1.0 here. It stops every block once the tensor's mean |error|
    # stops falling, having taken that last step (hqq_search has no such stop): count its steps.
    steps = []
    step = hqq_optimize.optimize_weights_proximal_legacy_step
    monkeypatch.setattr(hqq_optimize, "optimize_weights_proximal_legacy_step", lambda *a: steps.append(1) or step(*a))
    _, hqq_scale, hqq_zero = hqq_optimize.optimize_weights_proximal_legacy(
        blocks, (1 / s)[:, None], start[:, None], [0, qmax], axis=1, device="cpu"
    )
    assert len(steps) >= 18  # all 20 but at 8 bits: 18 (randn), 19 (heavy-tailed)
    scale, zero = hqq_search(blocks, bits=bits, kappa=1.0, iters=len(steps), round_start=round_start)
    assert torch.equal(scale, s) and torch.equal(hqq_scale[:, 0], 1 / s)  # the scale stays min/max's
    torch.testing.assert_close(zero, hqq_zero[:, 0], rtol=0, atol=1e-5)
    assert (zero - start).abs().max() > 0.01  # the solver moved it


def test_hqq_lowers_the_error():
    blocks = data("normal")
    lo = blocks.amin(dim=1).clamp(max=0)
    s0 = (blocks.amax(dim=1).clamp(min=0) - lo) / 15
    rule = block_err(asym_roundtrip(blocks, s0, torch.round(-lo / s0), 4), blocks)
    scale, zero = hqq_search(blocks, bits=4)
    assert not torch.equal(zero, torch.round(zero))  # a float zero: the grid moves by a fraction of a step
    err = block_err(hqq_roundtrip(blocks, scale, zero, 4), blocks)
    # measured MSE: min/max 0.008318, hqq 0.007574 (an lp objective, p = 0.7: not lower in every block)
    assert err.mean() / 64 < 0.0076 < 0.0083 < rule.mean() / 64


def test_activation_aware_hqq_lowers_the_weighted_error():
    blocks = data("normal")
    weights = importance().expand_as(blocks).contiguous()
    lo = blocks.amin(dim=1).clamp(max=0)
    s0 = (blocks.amax(dim=1).clamp(min=0) - lo) / 15
    rule = block_err(asym_roundtrip(blocks, s0, torch.round(-lo / s0), 4), blocks, weights)
    plain = block_err(hqq_roundtrip(blocks, *hqq_search(blocks, bits=4), 4), blocks, weights)
    aware = block_err(hqq_roundtrip(blocks, *hqq_search(blocks, bits=4, weights=weights), 4), blocks, weights)
    assert aware.sum() < 0.97 * plain.sum() < rule.sum()  # measured 3971 vs 4250 (min/max 4675), weighted SSE


def test_hqq_search_is_per_block():
    blocks = data("heavy", n=3000)
    whole = hqq_search(blocks, bits=3)
    head = hqq_search(blocks[:1000], bits=3)
    assert all(torch.equal(w[:1000], h) for w, h in zip(whole, head, strict=True))


def test_no_nan_on_zero_and_constant_blocks():
    special = torch.stack([torch.zeros(64), torch.full((64,), 3.0), torch.full((64,), -3.0), torch.full((64,), 1e-40)])
    blocks = torch.cat([special, data("normal", n=4)])
    weights = torch.ones_like(blocks)
    weights[3:5] = 0  # blocks whose every weight is zero
    for w in (None, weights):
        scale, zero = hqq_search(blocks, bits=4, weights=w)
        assert torch.isfinite(scale).all() and torch.isfinite(zero).all()
        assert scale[0] == 0 and zero[0] == 0
        # 0, 3 (code 15, zero 0) and -3 (code 0, zero 15) are exact
        assert torch.equal(hqq_roundtrip(blocks[:3], scale[:3], zero[:3], 4), blocks[:3])
        for grid in (sym_grid, asym_grid):
            propose, roundtrip = grid(blocks, 4)
            best = mse_search(blocks, propose=propose, roundtrip=roundtrip, weights=w, refit=True)
            assert all(torch.isfinite(v.float()).all() for v in best.values())
            assert torch.isfinite(roundtrip(best)).all()


def test_hqq_search_rejects_bad_input():
    blocks = data("normal", n=4, block=8)
    with pytest.raises(ValueError, match="bits must be an int from 1 to 8"):
        hqq_search(blocks, bits=9)
    with pytest.raises(ValueError, match="0 < lp_norm <= 1"):
        hqq_search(blocks, bits=4, lp_norm=2.0)
    with pytest.raises(ValueError, match="2-D float32"):
        hqq_search(blocks[0], bits=4)


def test_real_weights(smollm2_weights):
    blocks = smollm2_weights["blk.0.attn_q.weight"].reshape(-1, 64)[:8192].contiguous()
    propose, roundtrip = asym_grid(blocks, 4)
    rule = block_err(roundtrip(propose(torch.ones(len(blocks)))), blocks)
    searched = block_err(roundtrip(mse_search(blocks, propose=propose, roundtrip=roundtrip, refit=True)), blocks)
    hqq = block_err(hqq_roundtrip(blocks, *hqq_search(blocks, bits=4), 4), blocks)
    assert (searched <= rule).all()
    assert searched.sum() < rule.sum() and hqq.sum() < rule.sum()
