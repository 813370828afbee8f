"""calibration/statistics: each accumulator by hand on a toy layer (the bit-for-bit checks against full forwards
on real models are test_engine.py's)."""

import pytest
import torch
from torch import nn

from lowbit.calibration.statistics import ABS_MEAN, HESSIAN, HESSIAN32, IMPORTANCE, OUTLIERS, Statistics, square_sums
from lowbit.errors import InputError


def collected(wants, inputs, masks=None, **options):
    layer = nn.Linear(3, 2)
    stats = Statistics({"l": layer}, wants, len(inputs), **options)
    with stats.hooked(), torch.no_grad():
        for b, x in enumerate(inputs):
            stats.batch, stats.mask = b, None if masks is None else masks[b]
            layer(x)
    assert not layer._forward_pre_hooks
    return stats.result()


def test_each_statistic_by_hand():
    g = torch.Generator().manual_seed(0)
    inputs = [torch.randn(2, 4, 3, generator=g) for _ in range(2)]
    rows = torch.cat([x.reshape(-1, 3) for x in inputs]).double()
    found = collected([IMPORTANCE, ABS_MEAN, HESSIAN, HESSIAN32], inputs)
    torch.testing.assert_close(found[IMPORTANCE]["l"], (rows ** 2).mean(0).float())
    torch.testing.assert_close(found[ABS_MEAN]["l"], rows.abs().mean(0).float())
    torch.testing.assert_close(found[HESSIAN]["l"], 2 * rows.T @ rows / rows.shape[0])
    torch.testing.assert_close(found[HESSIAN32]["l"], 2 * rows.T @ rows / rows.shape[0], rtol=1e-6, atol=1e-6)
    assert found[HESSIAN]["l"].dtype == torch.float64 and found[IMPORTANCE]["l"].dtype == torch.float32


def test_importance_leaves_padding_out_and_the_others_count_it():
    x = torch.tensor([[[1.0, 2.0, 3.0], [100.0, 100.0, 100.0]]])
    mask = torch.tensor([[True, False]])
    found = collected([IMPORTANCE, ABS_MEAN], [x], [mask])
    assert torch.equal(found[IMPORTANCE]["l"], torch.tensor([1.0, 4.0, 9.0]))
    assert torch.equal(found[ABS_MEAN]["l"], torch.tensor([50.5, 51.0, 51.5]))
    assert square_sums(x, mask)[1] == 1


def test_errors_name_the_layer_and_the_statistic():
    with pytest.raises(InputError, match="received no input during calibration: AWQ has no mean"):
        collected([ABS_MEAN], [])
    with pytest.raises(InputError, match="received no input during calibration: GPTQ has no Hessian"):
        collected([HESSIAN], [])
    with pytest.raises(InputError, match=r"activations of l hold Inf: in 1 of its 3 input channels \(calibration "
                                         r"batch 2 of 2\)"):
        collected([IMPORTANCE], [torch.ones(1, 3), torch.tensor([[1.0, float("inf"), 1.0]])])
    with pytest.raises(InputError, match="activations of l hold NaN or Inf: GPTQ cannot use them"):
        collected([HESSIAN32], [torch.tensor([[float("nan"), 1.0, 1.0]])])
    with pytest.raises(InputError, match="unknown statistic 'mean'"):
        Statistics({}, ["mean"])


def test_outliers_count_each_input_once_and_leave_padding_out():
    q, k = nn.Linear(3, 2), nn.Linear(3, 2)
    stats = Statistics({"q": q, "k": k}, [OUTLIERS], 2, threshold=6.0)
    x = torch.tensor([[[6.0, -7.0, 1.0], [-6.5, 2.0, 9.0], [100.0, 100.0, 100.0]]])  # the last token is padding
    with stats.hooked(), torch.no_grad():
        for b in range(2):
            stats.batch, stats.mask = b, torch.tensor([[True, True, False]])
            q(x), k(x)
    found = stats.result()[OUTLIERS]
    for name, shares in (("q", None), ("k", "q")):
        assert torch.equal(found[name].counts, torch.tensor([4, 2, 2])) and found[name].counts.dtype == torch.int64
        assert torch.equal(found[name].peak, torch.tensor([6.5, 7.0, 9.0]))
        assert found[name].positions == 4 and found[name].shares_input_with == shares


def test_outlier_errors():
    with pytest.raises(InputError, match=r"the input of l holds NaN or Inf \(batch 2 of 2\)"):
        collected([OUTLIERS], [torch.ones(1, 3), torch.tensor([[1.0, float("nan"), 1.0]])], threshold=6.0)
    with pytest.raises(InputError, match=r"nn.Linear l received no input \(1 such layers\)"):
        collected([OUTLIERS], [], threshold=6.0)
    with pytest.raises(InputError, match="a threshold goes with the statistic 'outliers' and only with it"):
        Statistics({}, [OUTLIERS])
    with pytest.raises(InputError, match="a threshold goes with the statistic 'outliers' and only with it"):
        Statistics({}, [IMPORTANCE], threshold=6.0)
