"""Property tests: arbitrary finite inputs against the reference libraries (hypothesis)."""

import bitsandbytes.functional as F
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

import lowbit

# finite float32 values over a wide range, including exact zeros, ties and subnormals
finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(1, 300), elements=finite), st.sampled_from([32, 64, 128]))
def test_nf4_equals_bitsandbytes(x, block):
    t = torch.from_numpy(x)
    packed, state = F.quantize_4bit(t, blocksize=block, quant_type="nf4")
    q = lowbit.quantize(t, "nf4", block_size=block)
    assert torch.equal(q.parts["codes"], packed.reshape(-1))
    assert torch.equal(q.dequantize(), F.dequantize_4bit(packed, state).reshape(-1))


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.tuples(st.integers(1, 4), st.sampled_from([32, 64, 96])), elements=finite),
       st.sampled_from(["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]))
@example(x=np.array([[1.0] * 11 + [0.0] + [1.0] * 8 + [-0.0] + [1.0] * 11], np.float32), name="q4_1")  # found by CI
@example(x=np.array([[1.1754944e-38] + [0.0] * 31], np.float32), name="q4_1")  # found by CI: 1/d overflows
# extreme inputs overflow in gguf-py's numpy arithmetic (scales past fp16, 1/d of a subnormal d)
# exactly as in ggml; its warnings are expected here
@pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf")
def test_gguf_legacy_bytes_equal_gguf(x, name):
    """Equal bytes wherever gguf-py's decode is finite; where a block's fp16 d or m overflows
    (gguf-py then stores inf), lowbit refuses the input instead."""
    qtype = GGMLQuantizationType[name.upper()]
    ref = gguf_quantize(x, qtype)
    if not np.isfinite(gguf_dequantize(ref, qtype)).all():
        with pytest.raises(ValueError, match="cannot hold block"):
            lowbit.quantize(torch.from_numpy(x), name)
        return
    ours = lowbit.quantize(torch.from_numpy(x), name).tobytes()
    assert _unsigned_zero_min(ours, name) == _unsigned_zero_min(ref.tobytes(), name)


def _unsigned_zero_min(data: bytes, name: str) -> bytes:
    """Q4_1/Q5_1 store the block minimum m as fp16 at bytes 2..3. When a block's minimum is
    a zero that occurs as both +0 and -0, llama.cpp's reference (``if (v < min)``) keeps the
    first one, while gguf-py's numpy ``min`` returns whichever its SIMD lane order meets
    last. lowbit follows llama.cpp; m = -0 and m = +0 decode to the same values, so the
    comparison ignores the sign of a zero m and nothing else."""
    if name not in ("q4_1", "q5_1"):
        return data
    b = np.frombuffer(data, np.uint8).reshape(-1, lowbit.get_format(name).param("bytes")).copy()
    m = b[:, 2:4].copy().view(np.uint16)
    b[:, 2:4] = np.where(m == 0x8000, 0, m).view(np.uint8)
    return b.tobytes()


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(1, 200), elements=finite),
       # a plain cast (fp16) has no scale to bring a large weight into range: tests/formats/test_cast.py
       st.sampled_from([f for f in lowbit.formats() if not lowbit.get_format(f).row_blocks
                        and lowbit.get_format(f).family != "cast"]))
def test_every_blockwise_format_is_finite_and_shaped(x, fmt):
    out = lowbit.quantize(torch.from_numpy(x), fmt).dequantize()
    assert out.shape == x.shape and torch.isfinite(out).all()
