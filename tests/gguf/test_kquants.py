"""Q4_K / Q6_K: gguf reads our bytes as we do; error within llama.cpp's test-quantize-fns limits."""

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize

import lowbit
from lowbit.errors import UnrepresentableError
from lowbit.gguf.kquants import QK_K
from lowbit.representable import largest_magnitude, probe_units

# llama.cpp tests/test-quantize-fns.cpp: MAX_QUANTIZATION_TOTAL_ERROR for >= 4-bit types,
# measured as sqrt(sum of squared errors) / n on 0.1 + 2 cos(i), n = 32 * 128.
MAX_QUANTIZATION_TOTAL_ERROR = 0.002


def gguf_read(q, name, rows):
    data = np.frombuffer(q.tobytes(), np.uint8).reshape(rows, -1)
    return torch.from_numpy(dequantize(data, GGMLQuantizationType[name.upper()]).astype(np.float32))


@pytest.mark.parametrize("name", ["q4_k", "q6_k"])
def test_test_quantize_fns_error_limit(name):
    n = 32 * 128
    x = (0.1 + 2 * torch.cos(torch.arange(n, dtype=torch.float32))).view(1, n)
    out = lowbit.quantize(x, name).dequantize()
    err = ((out - x).double() ** 2).sum().sqrt().item() / n
    assert err < MAX_QUANTIZATION_TOTAL_ERROR, err


@pytest.mark.parametrize("name", ["q4_k", "q6_k"])
def test_gguf_decodes_our_bytes_identically(name, smollm2_weights):
    g = torch.Generator().manual_seed(1)
    edge = torch.randn(4, 512, generator=g)
    edge[0] = 0  # all-zero super-blocks
    edge[1, :256] = edge[1, :256].abs() + 3  # all-positive: min clamps to 0
    edge[2, :32] = 0  # one all-zero sub-block
    inputs = {
        "normal": torch.randn(64, 512, generator=g),
        "heavy": torch.distributions.StudentT(2.0).sample((16, 1024)),
        "edge": edge,
        "smollm2": smollm2_weights["blk.3.ffn_down.weight"][:, :1536],
    }
    for label, x in inputs.items():
        q = lowbit.quantize(x, name)
        out = q.dequantize()
        assert torch.equal(out, gguf_read(q, name, x.shape[0])), label
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("name,bpw,rmse", [("q4_k", 4.5, 0.075), ("q6_k", 6.5625, 0.019)])
def test_bits_and_error_on_gaussian(name, bpw, rmse):
    x = torch.randn(128, 1024, generator=torch.Generator().manual_seed(2))
    q = lowbit.quantize(x, name)
    assert q.bits_per_weight == bpw
    assert ((q.dequantize() - x) ** 2).mean().sqrt().item() < rmse


def test_rows_must_hold_whole_super_blocks():
    with pytest.raises(ValueError, match="whole blocks of 256"):
        lowbit.quantize(torch.randn(4, 576), "q4_k")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.filterwarnings("ignore::RuntimeWarning:gguf")  # gguf-py decoding the overflowed bytes: inf * 0
@pytest.mark.parametrize("name", ["q4_k", "q6_k"])
def test_near_the_fp16_scale_limit(name, dtype):
    """At largest_magnitude gguf reads our bytes as we do, all finite; one value up, the
    unchecked bytes decode to inf in gguf too, and quantize raises instead."""
    m = largest_magnitude(lowbit.get_format(name), dtype)
    units = probe_units(QK_K)  # (k, 256) with max |x| = 1 per row
    x = (units * m).to(dtype)
    q = lowbit.quantize(x, name)
    out = q.dequantize()
    assert torch.isfinite(out).all() and torch.equal(out, gguf_read(q, name, x.shape[0]).to(dtype))
    up = torch.tensor(m, dtype=dtype).view(torch.int32 if dtype == torch.float32 else torch.int16) + 1
    above = (units * float(up.view(dtype))).to(dtype)
    raw = lowbit.quantize(above, name, allow_nonfinite=True)
    assert not torch.isfinite(gguf_read(raw, name, above.shape[0]).to(dtype)).all()
    with pytest.raises(UnrepresentableError, match=rf"^{name} cannot hold block \d+ .* in {str(dtype)[6:]}$"):
        lowbit.quantize(above, name)


def test_q6_k_tiny_sub_block_gets_a_finite_scale():
    """A sub-block of magnitude ~1e-25 (x^2 underflows to 0) once gave 0/0 = NaN and a false
    UnrepresentableError; llama.cpp's make_qx_quants takes scale 0 there (suml2 ? sumlx/suml2 : 0)."""
    torch.manual_seed(0)
    x = torch.randn(256)
    x[:16] *= 1e-25
    q = lowbit.quantize(x, "q6_k")
    y = q.dequantize()
    assert torch.isfinite(y).all()
    assert torch.allclose(y[16:], x[16:], atol=0.1)
