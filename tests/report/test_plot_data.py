"""The data behind the figures, computed without matplotlib: the Pareto front, a plan row's bars, label spacing."""

from itertools import pairwise

import pytest

from lowbit.report import plot_data as pd

from .helpers import COMPARE


def test_pareto_front_is_the_lowest_kl_for_at_most_those_bits():
    pts, _ = pd.points([r for r in COMPARE["results"] if not pd.is_keep_row(r)], "kl_mean", group="lowbit")
    front = pd.pareto_front(pts)
    assert [p.label for p in front] == ["nf4+dq", "budget 4.5", "q8_0"]
    assert all(a.bits < b.bits and a.value > b.value for a, b in pairwise(front))


def test_plan_row_choice_errors():
    plan_row = next(r for r in COMPARE["results"] if r["format"] == "budget 4.5")
    two = {"results": [plan_row, dict(plan_row, format="budget 4.25")]}
    with pytest.raises(ValueError, match="2 rows mix formats: name one with --row"):
        pd.plan_bars(two)
    with pytest.raises(ValueError, match="no row 'nf9'"):
        pd.plan_bars(COMPARE, row="nf9")
    with pytest.raises(ValueError, match="no layer_formats"):
        pd.plan_bars(COMPARE, row="keep bfloat16")


def test_spread_keeps_order_spacing_and_bounds():
    ys = pd.spread([10.0, 11.0, 12.0, 50.0, 95.0, 96.0], 5.0, 0.0, 100.0)
    assert all(b - a >= 5.0 - 1e-9 for a, b in pairwise(ys))  # sorted, never closer than a label's height
    assert ys[3] == 50.0  # a label with room stays at its point
    assert sum(ys[:3]) / 3 == pytest.approx(11.0)  # a crowded group is centred on its points
    assert ys[0] >= 0.0 and ys[-1] <= 100.0
