"""Q8_0/Q4_0/Q4_1/Q5_0/Q5_1 byte for byte against gguf.quants (docs/formats.md#gguf-legacy-blocks)."""

import contextlib

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quantize
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import lowbit
from lowbit import dispatch
from lowbit.errors import UnrepresentableError
from lowbit.gguf.legacy import QK
from lowbit.representable import largest_magnitude, probe_units

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
            with dispatch.use("reference"):
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
    with pytest.raises(ValueError, match="has a fixed block of 32 weights"):
        lowbit.quantize(torch.randn(4, 64), "q4_0", block_size=64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf")  # gguf-py's fp16 d overflows just past the limit
def test_just_inside_the_range_equals_gguf_and_past_it_raises(name, dtype):
    spec = lowbit.get_format(name)
    qtype = GGMLQuantizationType[name.upper()]
    m = largest_magnitude(spec, dtype)
    x = (probe_units(QK) * m).to(dtype)  # (k, 32): lone +-m, a +-m pair, all m, random blocks with max |x| = m
    for reference_path in (False, True):
        with dispatch.use("reference") if reference_path else contextlib.nullcontext():
            q = lowbit.quantize(x, name)
            out = q.dequantize()
        ref = quantize(x.float().numpy(), qtype)
        assert not first_bad_blocks(q.tobytes(), ref.tobytes(), spec.param("bytes"))
        ref_out = torch.from_numpy(dequantize(ref, qtype).astype(np.float32)).to(dtype)
        assert torch.isfinite(out).all() and torch.equal(out, ref_out)
    if m == torch.finfo(dtype).max:  # q4_0 / q5_0 hold every float16: 8 or 16 * (65504 / 8 or 16) is exact
        assert dtype == torch.float16 and name in ("q4_0", "q5_0")
        return
    up = torch.tensor(m, dtype=dtype).view({torch.float32: torch.int32}.get(dtype, torch.int16)) + 1
    above = (probe_units(QK) * float(up.view(dtype))).to(dtype)
    ref_out = dequantize(quantize(above.float().numpy(), qtype), qtype)
    assert not torch.isfinite(torch.from_numpy(ref_out.astype(np.float32)).to(dtype)).all()  # gguf-py: inf
    with pytest.raises(UnrepresentableError, match=rf"^{name} cannot hold block \d+ "):
        lowbit.quantize(above, name)


# wide enough that a block's fp16 d (or m) overflows in about half the examples
wide = st.floats(min_value=-1e7, max_value=1e7, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=60, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 3), st.sampled_from([32, 64])), elements=wide),
       st.sampled_from(NAMES), st.sampled_from(["float32", "float16"]))
@pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf")
@pytest.mark.filterwarnings("ignore::RuntimeWarning:numpy")  # float16 casts of out-of-range examples
def test_raises_exactly_where_gguf_decodes_inf(x, name, dtype):
    """lowbit raises iff gguf-py's bytes decode to a non-finite value in the input's dtype,
    naming the first such block; otherwise the bytes are gguf-py's."""
    t = torch.from_numpy(x).to(getattr(torch, dtype))
    assume(torch.isfinite(t).all())  # float16 input: only values it can hold
    qtype = GGMLQuantizationType[name.upper()]
    ref = quantize(t.float().numpy(), qtype)
    ref_out = torch.from_numpy(dequantize(ref, qtype).astype(np.float32)).to(t.dtype).reshape(-1, QK)
    bad = (~torch.isfinite(ref_out)).any(dim=1).nonzero().flatten().tolist()
    event("holds" if not bad else "raises")
    if not bad:
        assert lowbit.quantize(t, name).tobytes() == ref.tobytes()
        return
    with pytest.raises(UnrepresentableError, match=rf"^{name} cannot hold block {bad[0]} "):
        lowbit.quantize(t, name)
