"""Property tests: arbitrary finite inputs against the reference libraries (hypothesis)."""

import bitsandbytes.functional as F
import numpy as np
import torch
from gguf import GGMLQuantizationType
from gguf.quants import quantize as gguf_quantize
from hypothesis import given, settings
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
def test_gguf_legacy_bytes_equal_gguf(x, name):
    ours = lowbit.quantize(torch.from_numpy(x), name).tobytes()
    assert ours == gguf_quantize(x, GGMLQuantizationType[name.upper()]).tobytes()


@settings(max_examples=40, deadline=None)
@given(arrays(np.float32, st.integers(1, 200), elements=finite),
       st.sampled_from([f for f in lowbit.formats() if not lowbit.get_format(f).row_blocks]))
def test_every_blockwise_format_is_finite_and_shaped(x, fmt):
    out = lowbit.quantize(torch.from_numpy(x), fmt).dequantize()
    assert out.shape == x.shape and torch.isfinite(out).all()
