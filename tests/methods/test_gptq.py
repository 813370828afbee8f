"""GPTQ: the batched implementation equals a plain float64 Algorithm 1 written here; it beats rounding."""

import pytest
import torch

import lowbit
from lowbit.formats.registry import codec_for
from lowbit.methods.gptq import gptq_quantize
from lowbit.scaling import double_quant

FORMATS = ["int4", "int3", "int4_asym", "nf4", "fp4_e2m1"]


def algorithm_1(W, H, fmt, block, act_order=False, dq=False):
    """arXiv 2210.17323 Algorithm 1, one column at a time in float64, with the format's per-block scales
    (chosen when a block's first column is reached, or all up front from W with act-order or double
    quantization, then compressed and decompressed bitsandbytes-style) as the quantizer."""
    spec = lowbit.get_format(fmt)
    codec = codec_for(spec)
    W, H = W.double().clone(), H.double().clone()
    out_f, in_f = W.shape
    tensor_parts = codec.tensor_parts(spec, W.reshape(-1).float(), block)
    order = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(in_f)
    scales = {}
    if act_order or dq:
        for g in range(in_f // block):
            scales[g] = codec.choose_scales(spec, W[:, g * block:(g + 1) * block].float().contiguous(), tensor_parts)
    if dq:  # the stored order of blocks is row-major: block g of row r is flat block r * groups + g
        flat = torch.stack([scales[g]["scales"] for g in range(in_f // block)], dim=1).reshape(-1)
        kept = double_quant.decompress(double_quant.compress(flat)).view(out_f, -1)
        scales = {g: {"scales": kept[:, g]} for g in scales}
    H = H[order][:, order] + 0.01 * torch.diagonal(H).mean() * torch.eye(in_f, dtype=torch.float64)
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    W = W[:, order]
    Q = torch.empty_like(W)
    for k in range(in_f):
        j = int(order[k])
        g = j // block
        if g not in scales:
            scales[g] = codec.choose_scales(spec, W[:, k:k + block].float().contiguous(), tensor_parts)
        parts = {**tensor_parts, **scales[g]}
        Q[:, k] = codec.decode(spec, codec.encode(spec, W[:, k].float()[:, None].contiguous(), parts), parts)[:, 0]
        err = (W[:, k] - Q[:, k]) / U[k, k]
        W[:, k:] -= err[:, None] * U[k, k:][None, :]
    out = torch.empty_like(Q)
    out[:, order] = Q
    return out.float()


def problem(out_f=24, in_f=160, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(512, in_f, generator=g) * torch.linspace(0.2, 3.0, in_f)  # unequal input channels
    X[:, :in_f // 4] += X[:, in_f // 4:in_f // 2]  # correlated ones: what GPTQ exploits
    return torch.randn(out_f, in_f, generator=g), 2 * X.T @ X, X


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_batched_equals_the_papers_algorithm(fmt, act_order):
    W, H, _ = problem()
    result = gptq_quantize(W, H, fmt, block_size=32, act_order=act_order, lazy=64)  # batches of 64, 64, 32
    expected = algorithm_1(W, H, fmt, 32, act_order)
    assert torch.equal(result.qweight.dequantize(), expected)
    assert not result.damp_raised


@pytest.mark.parametrize("fmt", ["int4", "nf4"])
@pytest.mark.parametrize("act_order", [False, True])
def test_double_quantized_scales_are_the_ones_rounded_against_and_stored(fmt, act_order):
    W, H, _ = problem(out_f=40, in_f=96)  # 120 blocks of 32: the 256-scale groups of +dq span rows
    result = gptq_quantize(W, H, fmt, block_size=32, act_order=act_order, double_quant=True, lazy=64)
    assert torch.equal(result.qweight.dequantize(), algorithm_1(W, H, fmt, 32, act_order, dq=True))
    q = result.qweight
    plain = lowbit.quantize(W, fmt, block_size=32, double_quant=True)
    assert q.double_quant and list(q.parts) == list(plain.parts) and q.nbytes == plain.nbytes
    with pytest.raises(ValueError, match="double"):
        gptq_quantize(W, H, "int4_asym", block_size=32, double_quant=True)


# int4 in the default run; the others (~8 s each on a real 576-column layer) with -m slow
@pytest.mark.parametrize("fmt", [f if f == "int4" else pytest.param(f, marks=pytest.mark.slow) for f in FORMATS])
def test_output_error_is_lower_than_rounding(fmt, smollm2):
    model, tokenizer = smollm2[0], smollm2[1]
    layer = model.model.layers[3].self_attn.q_proj
    captured = []
    handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    text = "The quick brown fox jumps over the lazy dog. " * 40 + "def f(x):\n    return x * 2\n" * 20
    with torch.inference_mode():
        model(tokenizer(text, return_tensors="pt")["input_ids"][:, :512])
    handle.remove()
    X = captured[0].float()
    W = layer.weight.detach()
    result = gptq_quantize(W, 2 * X.T.double() @ X.double(), fmt)
    rtn = lowbit.quantize(W, fmt)
    err_gptq = (X @ (W - result.qweight.dequantize()).T).square().sum()
    err_rtn = (X @ (W - rtn.dequantize()).T).square().sum()
    assert err_gptq < 0.9 * err_rtn, (float(err_gptq), float(err_rtn))


def test_refusals():
    W, H, _ = problem()
    with pytest.raises(ValueError, match="levels on a grid"):
        gptq_quantize(W, H, "q4_0")
    with pytest.raises(ValueError, match="rows hold 160"):
        gptq_quantize(W, H, "int4", block_size=64)
    with pytest.raises(ValueError, match=r"must be \(160, 160\)"):
        gptq_quantize(W, H[:8, :8], "int4", block_size=32)
    with pytest.raises(ValueError, match="NaN or Inf"):
        gptq_quantize(W, H * float("nan"), "int4", block_size=32)


def test_a_hessian_that_will_not_factor_is_damped_more_and_reported():
    W, _, _ = problem()
    # 2 X^T X is positive semidefinite, and 1% damping makes it definite in exact arithmetic; rounding can
    # leave a tiny negative eigenvalue. Here one is -0.5: 1% (0.0099) and 10% fail, 100% factors.
    H = torch.diag(torch.cat([torch.ones(159), torch.tensor([-0.5])]))
    result = gptq_quantize(W, H, "int4", block_size=32)
    base = 0.01 * float(torch.diagonal(H).mean())
    assert result.damp_raised and result.damp == pytest.approx(100 * base)
    with pytest.raises(ValueError, match="not positive definite even damped"):
        gptq_quantize(W, torch.diag(torch.cat([torch.ones(159), torch.tensor([-1e9])])), "int4", block_size=32)
