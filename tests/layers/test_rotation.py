"""The Hadamard rotation: fwht equals the Sylvester matrix (scipy), rotate/unrotate are inverse, y = W x kept."""

import pytest
import torch
from scipy.linalg import hadamard

from lowbit.layers.rotation import fwht, hadamard_block, layer_signs, rotate, rotate_hessian, unrotate


@pytest.mark.parametrize(("n", "block"), [(576, 64), (1536, 512), (96, 32), (8, 8)])
def test_hadamard_block_and_fwht_equal_the_block_diagonal_sylvester_matrix(n, block):
    assert hadamard_block(n) == block
    x = torch.randn(3, n, dtype=torch.float64)
    H = torch.block_diag(*[torch.from_numpy(hadamard(block)).double()] * (n // block)) / block ** 0.5
    assert torch.allclose(fwht(x, block), x @ H.T, atol=1e-12)


def test_rotation_keeps_the_layer_output_and_the_hessian_is_rotated_with_it():
    n = 96
    signs, block = layer_signs("model.layers.0.mlp.up_proj", n), hadamard_block(n)
    assert signs.dtype == torch.int8 and set(signs.tolist()) == {-1, 1}
    assert torch.equal(signs, layer_signs("model.layers.0.mlp.up_proj", n))  # the same layer, the same signs
    assert not torch.equal(signs, layer_signs("model.layers.1.mlp.up_proj", n))
    W, X = torch.randn(10, n, dtype=torch.float64), torch.randn(50, n, dtype=torch.float64)
    Wr, Xr = rotate(W, signs, block), rotate(X, signs, block)
    assert torch.allclose(X @ W.T, Xr @ Wr.T, atol=1e-10)
    assert torch.allclose(unrotate(Wr, signs, block), W, atol=1e-12)
    assert torch.allclose(rotate_hessian(X.T @ X, signs, block), Xr.T @ Xr, atol=1e-9)


def test_an_odd_dimension_cannot_be_rotated():
    with pytest.raises(ValueError, match="even input dimension"):
        hadamard_block(75)
