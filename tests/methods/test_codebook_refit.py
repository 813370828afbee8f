"""+cb: the learned codebook refit after GPTQ is the least-squares optimum of the layer's output error."""

import dataclasses

import pytest
import torch

import lowbit
from lowbit.calibration.importance import calibration_batches
from lowbit.methods.codebook_refit import refit_codebook
from lowbit.methods.gptq import gptq_quantize
from lowbit.methods.gptq_model import gptq_layer
from lowbit.planning.config import QuantConfig


def problem(out_f=24, in_f=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(400, in_f, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, in_f, dtype=torch.float64)
    X[:, :in_f // 4] += X[:, in_f // 4:in_f // 2]  # correlated inputs, as GPTQ meets them
    W = torch.randn(out_f, in_f, generator=g)
    return W, 2 * X.T @ X / X.shape[0], X


def output_error(W, q, X):
    return float((X @ (W.double() - q.dequantize().double()).T).square().sum())


@pytest.mark.parametrize("fmt", ["lloyd3", "lloyd4", "qq4"])
def test_the_refit_codebook_is_the_least_squares_solution(fmt):
    """Against torch.linalg.lstsq on the explicit problem: the decoded weight with the one-hot codebook e_k
    gives column k of the design, X P_k^T flattened; the target is X W^T."""
    W, H, X = problem()
    q = gptq_quantize(W, H, fmt, block_size=32, double_quant=True).qweight
    refit = refit_codebook(W, H, q)
    book = q.parts["tensor_codebook"]
    design = []
    for k in range(book.numel()):
        one_hot = torch.zeros_like(book)
        one_hot[k] = 1.0
        Pk = dataclasses.replace(refit, parts={**refit.parts, "tensor_codebook": one_hot})
        design.append((X @ Pk.dequantize().double().T).reshape(-1))
    expected = torch.linalg.lstsq(torch.stack(design, 1), (X @ W.double().T).reshape(-1)).solution
    used = torch.stack(design, 1).abs().sum(0) > 0
    torch.testing.assert_close(refit.parts["tensor_codebook"].double()[used], expected[used], rtol=1e-4, atol=1e-5)
    assert output_error(W, refit, X) < output_error(W, q, X)
    for key in q.parts:  # only the codebook changes: codes, scales and layout are GPTQ's
        if key != "tensor_codebook":
            assert torch.equal(q.parts[key], refit.parts[key])


@pytest.mark.parametrize("fmt", ["lloyd3", "lloyd4"])
def test_gptq_with_refit_codebooks_is_never_worse_than_gptq_alone(fmt):
    """On random weights later rounds can come out worse (GPTQ is greedy): the best round is kept."""
    W, H, X = problem(48, 256, seed=1)
    plain = gptq_layer("l", W, H, QuantConfig.parse(f"{fmt}/32+dq+gptq"))
    refit = gptq_layer("l", W, H, QuantConfig.parse(f"{fmt}/32+dq+gptq+cb"))
    assert output_error(W, refit.qweight, X) < output_error(W, plain.qweight, X)
    assert refit.qweight.nbytes == plain.qweight.nbytes  # the same layout: a refit codebook costs nothing more


def test_on_a_real_layer_refit_codebooks_cut_the_output_error(smollm2):
    model, tokenizer = smollm2[0], smollm2[1]
    layer = model.model.layers[3].self_attn.q_proj
    captured = []
    handle = layer.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    batches, _ = calibration_batches(tokenizer, smollm2[2].kind, scored=16, count=2)  # the calibration split
    with torch.inference_mode():
        for batch in batches:
            model(batch)
    handle.remove()
    X = torch.cat(captured).double()
    W, H = layer.weight.detach(), 2 * X.T @ X / X.shape[0]
    plain = gptq_layer("q", W, H, QuantConfig.parse("lloyd4/32+dq+gptq"))
    refit = gptq_layer("q", W, H, QuantConfig.parse("lloyd4/32+dq+gptq+cb"))
    assert output_error(W, refit.qweight, X) < 0.97 * output_error(W, plain.qweight, X)


def test_a_format_with_no_codebook_of_its_own_is_refused():
    W, H, _ = problem()
    with pytest.raises(ValueError, match=r"nf4 stores no codebook of its own to refit; \+cb takes"):
        refit_codebook(W, H, lowbit.quantize(W, "nf4"))
    with pytest.raises(ValueError, match=r"\+cb refits a codebook stored with the tensor; nf4 has none"):
        QuantConfig.parse("nf4+gptq+cb")
    with pytest.raises(ValueError, match=r"\+cb refits the codebook .* add \+gptq"):
        QuantConfig.parse("lloyd4/32+cb")
    assert QuantConfig.parse("lloyd4/32+cb+dq+gptq@amse").label == "lloyd4/32+dq+gptq+cb@amse"
