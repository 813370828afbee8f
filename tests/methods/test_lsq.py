"""LSQ quantizers: the paper's step-size gradient by hand, convergence to a known optimal step, and a
conversion whose dequantize() is the trained fake quantization to the bit."""

import math

import pytest
import torch

import lowbit
from lowbit.io.model_io import check_layout
from lowbit.methods.lsq import LSQQuantizer


def test_step_gradient_is_the_papers_formula_by_hand():
    """int3 (Qp = Qn = 3), one block of 4 at s = 1: v/s = 0.5, -1.4, 2.6, 10 round to 0, -1, 3 and clip to 3.
    d sum(v_hat)/ds = g * [(0 - 0.5) + (-1 + 1.4) + (3 - 2.6) + 3] = 3.3 g, g = 1 / sqrt(4 * 3)."""
    v = torch.tensor([[0.5, -1.4, 2.6, 10.0]])
    lsq = LSQQuantizer(v, "int3", block_size=4, init="rule")
    with torch.no_grad():
        lsq.scale.fill_(1.0)
    w = v.clone().requires_grad_(True)
    out = lsq(w)
    assert out.tolist() == [[0.0, -1.0, 3.0, 3.0]]
    out.sum().backward()
    assert lsq.grad_scale == pytest.approx(1 / math.sqrt(12))
    assert lsq.scale.grad.item() == pytest.approx(3.3 / math.sqrt(12), rel=1e-6)
    assert w.grad.tolist() == [[1.0, 1.0, 1.0, 0.0]]  # straight through inside the range, 0 where clipped
    below = LSQQuantizer(-v, "int3", block_size=4, init="rule")
    with torch.no_grad():
        below.scale.fill_(1.0)
    below(-v).sum().backward()  # mirrored: -Qn below the range
    assert below.scale.grad.item() == pytest.approx(-3.3 / math.sqrt(12), rel=1e-6)


def test_lsq_plus_offset_gradient_and_float16_storage():
    """int2_asym with a float zero z: y = v/s + z on codes [0, 3]; d v_hat/dz = -s below or above, 0 inside."""
    v = torch.tensor([[-5.0, 0.2, 1.1, 9.0]])
    lsq = LSQQuantizer(v, "int2_asym", block_size=4, init="rule")
    with torch.no_grad():
        lsq.scale.fill_(1.0)
        lsq.zero.fill_(1.0001)  # stored as float16: 1.0 exactly
    out = lsq(v)
    assert out.tolist() == [[-1.0, 0.0, 1.0, 2.0]]  # codes 0, 1, 2, 3 minus z = 1
    out.sum().backward()
    g = 1 / math.sqrt(4 * 3)
    assert lsq.zero.grad.item() == pytest.approx(-2 * g)  # the two clipped elements
    assert lsq.convert(v).parts["zeros"].dtype == torch.float16


def test_training_the_step_converges_to_the_known_optimum():
    """Weights exactly on an int4 grid of step s* (every block reaching +-Qp): the reconstruction loss is 0 at
    s* and positive elsewhere, so LSQ started 30% off must find s*."""
    g = torch.Generator().manual_seed(0)
    s_star = 0.037
    q = torch.randint(-7, 8, (32, 64), generator=g).float()
    q[:, 0], q[:, 1] = 7, -7
    w = q * s_star
    lsq = LSQQuantizer(w, "int4", block_size=64, init="rule")
    with torch.no_grad():
        lsq.scale.mul_(1.3)
    with torch.no_grad():
        start = ((lsq(w) - w) ** 2).sum().item()
    opt = torch.optim.Adam(lsq.parameters(), lr=1e-3)
    for _ in range(400):
        opt.zero_grad()
        ((lsq(w) - w) ** 2).sum().backward()
        opt.step()
    assert torch.allclose(lsq.scale.detach(), torch.full((32,), s_star), rtol=2e-3), lsq.scale
    assert ((lsq(w) - w) ** 2).sum().item() < 1e-4 * start


@pytest.mark.parametrize("label", ["int3", "int4/32", "int3_asym/64", "nf4", "fp4_e2m1", "lloyd3/64", "ternary"])
def test_convert_stores_exactly_what_training_computed(label):
    config = lowbit.QuantConfig.parse(label)
    torch.manual_seed(3)
    weight = torch.nn.Parameter(torch.randn(24, 100) * torch.logspace(-2, 0, 100))  # a partial trailing block
    lsq = LSQQuantizer(weight, config.format, block_size=config.block_size)
    opt = torch.optim.Adam([weight, *lsq.parameters()], lr=1e-2)
    target = torch.randn(24, 100)
    for _ in range(5):  # weights, steps and zeros all move away from where they started
        opt.zero_grad()
        ((lsq(weight) - target) ** 2).mean().backward()
        opt.step()
    q = lsq.convert(weight)
    with torch.no_grad():
        trained = lsq(weight)
    assert torch.equal(q.dequantize(), trained)
    check_layout(q, label)  # the layout lowbit.json-saved models are checked against when loaded


@pytest.mark.parametrize(("fmt", "message"), [("q4_k", "GGUF block format"), ("mxfp4", "as codes"),
                                              ("nvfp4", "as codes")])
def test_formats_without_a_learnable_grid_are_refused(fmt, message):
    with pytest.raises(ValueError, match=message):
        LSQQuantizer(torch.randn(4, 256), fmt)
    with pytest.raises(ValueError, match="for symmetric integers"):
        LSQQuantizer(torch.randn(4, 64), "nf4", init="lsq")


def test_the_papers_initial_step():
    w = torch.randn(8, 64)
    lsq = LSQQuantizer(w, "int4", block_size=64, init="lsq")
    torch.testing.assert_close(lsq.scale.detach(), 2 * w.abs().mean(1) / math.sqrt(7))
