"""Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 byte for byte against gguf.quants (SPEC.md §5)."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize

import lowbit
from lowbit import kernels

NAMES = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]


def cases():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(64, 256, generator=g)
    heavy = torch.distributions.StudentT(2.0).sample((32, 512))
    edge = torch.randn(8, 64, generator=g)
    edge[0] = 0  # all-zero blocks
    edge[1, :32] = -edge[1, :32].abs() * 10  # the largest magnitude is negative
    edge[2, :32] = edge[2, :32].abs() + 5  # all-positive block: min > 0
    edge[3, :32] = torch.tensor([3.0, -3.0] * 16)  # |max| tie: the first one wins
    edge[4, :32] = torch.arange(32) / 31 * 15  # codes on exact .5 boundaries
    # scales so small that 1/d overflows to inf (found by hypothesis in CI): every code is 0
    tiny = 1.1754944e-38  # FLT_MIN
    edge[5, :32] = 0
    edge[5, 0] = tiny
    edge[5, 32:] = torch.tensor([tiny, -tiny / 2, 0.0, 3e-39] * 8)
    edge[6, :32] = torch.tensor([-tiny, tiny / 2, 0.0, 1e-45] * 8)
    edge[6, 32:] = 0
    edge[6, 33] = -2e-38
    return {"normal": normal, "heavy": heavy, "edge": edge, "fp16": normal.half(), "bf16": heavy.bfloat16()}


def first_bad_blocks(ours: bytes, ref: bytes, block_bytes: int) -> list[int]:
    a = np.frombuffer(ours, np.uint8).reshape(-1, block_bytes)
    b = np.frombuffer(ref, np.uint8).reshape(-1, block_bytes)
    return np.nonzero((a != b).any(axis=1))[0][:5].tolist()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("reference_path", [False, True])
@pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf")  # the tiny-scale edge blocks overflow 1/d there too
def test_bytes_and_values_equal_gguf(name, reference_path):
    qtype = GGMLQuantizationType[name.upper()]
    block_bytes = lowbit.get_format(name).param("bytes")
    for label, x in cases().items():
        if reference_path:
            with kernels.reference():
                q = lowbit.quantize(x, name)
                out = q.dequantize(torch.float32)
        else:
            q = lowbit.quantize(x, name)
            out = q.dequantize(torch.float32)
        ref = quantize(x.float().numpy(), qtype)
        bad = first_bad_blocks(q.tobytes(), ref.tobytes(), block_bytes)
        assert not bad, f"{name} {label}: blocks {bad} differ"
        ref_out = dequantize(ref, qtype).astype(np.float32)
        assert np.array_equal(out.numpy().view(np.int32), ref_out.view(np.int32)), f"{name} {label}"


@pytest.mark.parametrize("name,bpw", [("q8_0", 8.5), ("q4_0", 4.5), ("q4_1", 5.0), ("q5_0", 5.5), ("q5_1", 6.0)])
def test_bits_per_weight(name, bpw):
    assert lowbit.quantize(torch.randn(4, 256), name).bits_per_weight == bpw


def test_rows_must_hold_whole_blocks():
    with pytest.raises(ValueError, match="whole blocks of 32"):
        lowbit.quantize(torch.randn(4, 48), "q4_0")
    with pytest.raises(ValueError, match="fixed block size"):
        lowbit.quantize(torch.randn(4, 64), "q4_0", block_size=64)
