"""nf4 and bnb_fp4 against bitsandbytes, bit for bit.

Rules: docs/formats.md#normalfloat-and-bitsandbytes-fp4, docs/formats.md#double-quantization.
"""

from __future__ import annotations

import bitsandbytes.functional as F
import pytest
import torch

import lowbit
from lowbit.scaling.double_quant import dynamic_map

BLOCKS = [32, 64, 128, 256, 512, 1024, 2048, 4096]
BNB_TYPE = {"nf4": "nf4", "bnb_fp4": "fp4"}


def bnb_roundtrip(x: torch.Tensor, quant_type: str, block: int, double_quant: bool):
    # compress_statistics: bnb's own double quant, its native CPU kernel for the 8-bit step
    # (code for code in tests/scaling/test_double_quant.py).
    packed, state = F.quantize_4bit(x, blocksize=block, quant_type=quant_type, compress_statistics=double_quant)
    return packed.reshape(-1), F.dequantize_4bit(packed, state)


def assert_same(ours: torch.Tensor, ref: torch.Tensor, what: str):
    ours, ref = ours.reshape(-1), ref.reshape(-1)
    assert ours.dtype == ref.dtype
    # Values equal (bnb's own kernels disagree on the sign of a zero, so +0 == -0 here) ...
    diff = (ours != ref).nonzero().flatten()
    assert diff.numel() == 0, f"{what}: {diff.numel()} values differ, first at {diff[:5].tolist()}"
    # ... and every non-zero value bitwise identical.
    nz = ref != 0
    bits = torch.int32 if ref.dtype == torch.float32 else torch.int16
    assert torch.equal(ours[nz].view(bits), ref[nz].view(bits)), what


def samples(n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    normal = torch.randn(n, generator=g)
    heavy = torch.distributions.StudentT(2.0).sample((n,))  # heavy-tailed: outliers set absmax
    return {"normal": normal, "heavy": heavy * torch.rand(n, generator=g)}


def test_tables_equal_bitsandbytes():
    for fmt, qt in BNB_TYPE.items():
        ours = torch.tensor(lowbit.get_format(fmt).values)
        assert torch.equal(ours.view(torch.int32), F.get_4bit_type(qt, device="cpu").view(torch.int32)), fmt
    assert torch.equal(dynamic_map(), F.create_dynamic_map())


@pytest.mark.parametrize("fmt", ["nf4", "bnb_fp4"])
@pytest.mark.parametrize("block", BLOCKS)
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes_random(fmt, block, double_quant):
    torch.manual_seed(block)
    for name, x in samples(3 * 4096 + 37, seed=block).items():  # odd length: partial block, pad nibble
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            xx = x.to(dtype)
            packed, ref = bnb_roundtrip(xx, BNB_TYPE[fmt], block, double_quant)
            q = lowbit.quantize(xx, fmt, block_size=block, double_quant=double_quant)
            assert torch.equal(q.parts["codes"], packed), f"{fmt} {name} {dtype}: packed bytes differ"
            assert_same(q.dequantize(), ref, f"{fmt} block {block} {name} {dtype} dq={double_quant}")


@pytest.mark.parametrize("fmt", ["nf4", "bnb_fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_matches_bitsandbytes_smollm2(smollm2_weights, fmt, double_quant):
    for name, w in smollm2_weights.items():
        for block in (64, 256):
            # bnb blocks the flattened tensor; its CPU dequantize kernel instead restarts the
            # blocks on every row of a 2-D shape (see test_bnb_cpu_kernel_blocks_per_row), so
            # the reference round trip runs on the flat view.
            packed, ref = bnb_roundtrip(w.reshape(-1), BNB_TYPE[fmt], block, double_quant)
            q = lowbit.quantize(w, fmt, block_size=block, double_quant=double_quant)
            assert torch.equal(q.parts["codes"], packed)
            assert_same(q.dequantize(), ref.reshape(w.shape), f"{fmt} {name} block {block}")


def test_bnb_cpu_kernel_blocks_per_row():
    """bitsandbytes 0.50's CPU dequantize_4bit kernel reads a 2-D tensor whose rows do not
    hold whole blocks with other absmax values than quantize_4bit wrote; its pure-torch
    reference backend and a flat call agree with each other and with lowbit."""
    from bitsandbytes.backends.default.ops import _dequantize_4bit_compute
    from bitsandbytes.backends.utils import _get_4bit_code

    x = torch.randn(576, 576, generator=torch.Generator().manual_seed(0))  # 576 % 256 != 0
    packed, state = F.quantize_4bit(x, blocksize=256, quant_type="nf4")
    ours = lowbit.quantize(x, "nf4", block_size=256).dequantize()
    reference = _dequantize_4bit_compute(packed.reshape(-1), state.absmax, _get_4bit_code("nf4", "cpu"), 256,
                                         x.shape, torch.float32)
    assert torch.equal(ours, reference)
    flat = F.dequantize_4bit(*F.quantize_4bit(x.reshape(-1), blocksize=256, quant_type="nf4"))
    assert torch.equal(ours.reshape(-1), flat.reshape(-1))


def test_double_quant_bits_per_weight():
    x = torch.randn(4096, 4096)
    assert lowbit.quantize(x, "nf4").bits_per_weight == pytest.approx(4.5, abs=1e-6)
    bpw = lowbit.quantize(x, "nf4", double_quant=True).bits_per_weight
    # 4 + 8/64 + 32/(64*256) = 4.126953125, plus one fp32 offset per tensor
    # (docs/formats.md#double-quantization, docs/formats.md#bits-per-weight)
    assert bpw == pytest.approx(4.127, abs=0.01)
    assert bpw == pytest.approx(4 + 8 / 64 + 32 / (64 * 256) + 32 / x.numel(), abs=1e-9)
