"""Checks shared by every entry point: a block whose scales cost more bits than the float it replaces warns,
and the bits per weight a block costs are the bytes it stores."""

import warnings

import pytest
import torch

import lowbit
from lowbit.checks import block_bits_per_weight
from lowbit.errors import LowbitWarning

ALL = lowbit.formats()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def test_small_blocks_warn_default_blocks_do_not():
    x = torch.randn(1024)
    with pytest.warns(LowbitWarning, match=r"nf4 with block_size=1 stores 36 bits per weight, more than the 32 bits"):
        q = lowbit.quantize(x, "nf4", block_size=1)
    assert q.bits_per_weight == 36  # one fp32 scale (32 bits) + one 4-bit code per weight
    with pytest.warns(LowbitWarning, match=r"stores 20 bits per weight, more than the 16 bits of its float16"):
        lowbit.quantize(x.half(), "nf4", block_size=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LowbitWarning)
        lowbit.quantize(x.half(), "nf4", block_size=4)  # 4 + 32 / 4 = 12 bits
        lowbit.quantize(x.half(), "nf4", block_size=1, double_quant=True)  # 4 + 8 + 32 / 256 bits
        for fmt in ALL:
            for dtype in DTYPES:
                lowbit.quantize(torch.zeros(2, 512, dtype=dtype), fmt)


@pytest.mark.parametrize("fmt", ALL)
def test_block_bits_per_weight_equals_stored_bytes(fmt):
    spec = lowbit.get_format(fmt)
    blocks = [spec.default_block_size] if spec.fixed_block_size else [1, 2, 64]
    for block in blocks:
        for dq in [False, True] if spec.double_quant else [False]:
            # 256 blocks: whole bytes of codes, one whole double-quant group (slow K-quants: 4)
            x = torch.zeros((4 if spec.fixed_block_size else 256) * block)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", LowbitWarning)
                q = lowbit.quantize(x.view(-1, spec.default_block_size) if spec.row_blocks else x, fmt,
                                    block_size=block, double_quant=dq)
            per_tensor = sum(t.numel() * t.element_size() for name, t in q.parts.items()
                             if name.startswith("tensor_") or name == "scales_offset")
            assert block_bits_per_weight(spec, block, dq) == 8 * (q.nbytes - per_tensor) / x.numel()
