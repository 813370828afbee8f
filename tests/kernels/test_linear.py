"""The fused linear kernel (lowbit.kernels.linear) against dequantize-then-matmul.

Tolerance: the kernel decodes the same float32 weights as the reference (tested to the
bit through lowbit_decode_rows) and sums the products in another order, factoring each
block's scale out of its partial sum. Recursive float32 summation of K products is within
K * 2^-24 * sum|w x| of the exact sum (Higham, Accuracy and Stability, eq. 3.5); we allow
four times that, against the float64 product of the reference weight.
"""

import ctypes

import pytest
import torch

import lowbit
from lowbit import QuantLinear, dispatch, kernels

pytestmark = pytest.mark.skipif(not kernels.enabled(), reason="C kernels not built")
if kernels.enabled():
    from lowbit.kernels import linear as fused

CASES = [  # format, block (None: the format's own), extra quantize arguments
    ("int4", 64, {}), ("int4", 7, {}), ("int4_asym", 64, {}), ("int4_asym", 20, {"search": "hqq"}),
    ("nf4", 64, {}), ("nf4", 20, {"double_quant": True}), ("nf4", 33, {}), ("fp4_e2m1", 64, {}),
    ("int8", 64, {}), ("int8_asym", 32, {}), ("fp8_e4m3fn", 64, {}), ("mxfp4", None, {}), ("nvfp4", None, {}),
    ("q4_0", None, {}), ("q8_0", None, {}),
    # grouped 4-bit rows (in_features and block multiples of 32: linear.c GROUP), a zero point among them
    ("nf4", 32, {"double_quant": True}), ("int4_asym", 64, {"search": "hqq"}), ("nf4", 256, {}),
]
SHAPES = [(1, 32), (7, 64), (13, 96), (5, 33 * 32), (96, 576)]


def make(fmt, block, kw, n, k, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(n, k) * torch.rand(n, 1)
    return lowbit.quantize(w, fmt, block_size=block, **kw)


def bound(w, x, b):
    k = w.shape[1]
    scale = x.abs().double() @ w.abs().double().T + (0 if b is None else b.abs().double())
    return 4 * k * 2.0**-24 * scale + 1e-30


def check(y, q, x, b):
    w = q.dequantize(torch.float32, kernels="reference")
    exact = x.double() @ w.double().T + (0 if b is None else b.double())
    err = (y.double() - exact).abs()
    assert (err <= bound(w, x, b)).all(), f"max error {err.max():.3g}"


@pytest.mark.parametrize("fmt,block,kw", CASES, ids=[f"{c[0]}-{c[1]}-{'-'.join(c[2])}" for c in CASES])
@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("m", [1, 3, 40])
def test_fused_linear_matches_reference(fmt, block, kw, n, k, m):
    if fmt.startswith("q") and k % 32:
        pytest.skip("GGUF rows hold whole 32-weight blocks")
    q = make(fmt, block, kw, n, k)
    x = torch.randn(m, k)
    b = torch.randn(n) if m != 3 else None
    y = fused.linear(q, x, b)
    assert y is not None and y.shape == (m, n) and y.dtype == torch.float32
    check(y, q, x, b)


@pytest.mark.skipif(not fused.ISA if kernels.enabled() else True, reason="no AVX2 here")
@pytest.mark.parametrize("fmt,block,kw", CASES, ids=[f"{c[0]}-{c[1]}-{'-'.join(c[2])}" for c in CASES])
@pytest.mark.parametrize("m", [1, 3, 40])
def test_simd_and_portable_paths_agree_to_the_bit(fmt, block, kw, m):
    q = make(fmt, block, kw, 37, 33 * 32, seed=1)
    x, b = torch.randn(m, 33 * 32), torch.randn(37)
    assert torch.equal(fused.linear(q, x, b, isa=1), fused.linear(q, x, b, isa=0))


@pytest.mark.parametrize("fmt,block,kw", CASES, ids=[f"{c[0]}-{c[1]}-{'-'.join(c[2])}" for c in CASES])
@pytest.mark.parametrize("isa", [0, 1])
def test_decoded_rows_equal_the_reference_decode(fmt, block, kw, isa):
    if isa and not fused.ISA:
        pytest.skip("no AVX2 here")
    q = make(fmt, block, kw, 13, 96 if not fmt.startswith("q") else 128)
    p = fused.prepare(q)
    out = torch.empty(q.shape)
    fused.native.lowbit_decode_rows(ctypes.byref(p.weights), 0, q.shape[0], out.data_ptr(), isa)
    ref = q.dequantize(torch.float32, kernels="reference")
    assert torch.equal(out.view(torch.int32), ref.view(torch.int32))


def test_result_does_not_depend_on_the_thread_count():
    q = make("nf4", 64, {}, 301, 576)
    x = torch.randn(1, 576)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = fused.linear(q, x, None)
        torch.set_num_threads(max(2, threads))
        many = fused.linear(q, x, None)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many)


def test_quant_linear_runs_the_kernel_and_autograd_the_reference(monkeypatch):
    q = make("int4", 64, {}, 24, 64)
    layer = QuantLinear(q, torch.nn.Parameter(torch.randn(24)))
    x = torch.randn(2, 5, 64)
    ran = []
    lookup = dispatch.lookup

    def spy(op, family):  # whether the kernel ran, seen directly: its summation order may equal torch's on a CPU
        path = lookup(op, family)
        return None if path is None else (lambda *a: ran.append(family) or path(*a))

    monkeypatch.setattr(dispatch, "lookup", spy)
    with torch.no_grad():
        y = layer(x)
        assert ran == ["int"]
        with dispatch.use("reference"):
            ref = layer(x)
    assert ran == ["int"] and y.shape == (2, 5, 24)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    check(y.reshape(-1, 24), q, x.reshape(-1, 64), layer.bias.detach())
    xg = x.clone().requires_grad_()
    layer(xg).sum().backward()  # no backward in the kernel: autograd runs the reference path
    assert torch.allclose(xg.grad, q.dequantize().sum(0).expand_as(xg), atol=1e-5)


def test_formats_without_a_kernel_take_the_reference_path():
    for fmt in ("int3", "q5_0", "q4_k"):
        k = 256 if fmt == "q4_k" else 64
        q = lowbit.quantize(torch.randn(4, k), fmt)
        assert fused.linear(q, torch.randn(1, k), None) is None
        with torch.no_grad():
            y = QuantLinear(q)(torch.randn(1, k))
        assert y.shape == (1, 4)
