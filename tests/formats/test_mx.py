"""Microscaling: OCP MX hand vectors, gguf MXFP4 bit-exactness, NVFP4 (torchao recipe).

Rules: docs/formats.md#microscaling-mx, docs/formats.md#nvfp4.
"""

import math

import ml_dtypes
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

import lowbit
from lowbit.formats.scale_encodings import e4m3_decode, e8m0_decode
from lowbit.scaling.packing import unpack_codes

MX = ["mxfp4", "mxfp6_e2m3", "mxfp6_e3m2", "mxfp8_e4m3", "mxint8"]
EMAX = {"mxfp4": 2, "mxfp6_e2m3": 2, "mxfp6_e3m2": 4, "mxfp8_e4m3": 8, "mxint8": 0}
ML_ELEMENT = {
    "mxfp4": ml_dtypes.float4_e2m1fn,
    "mxfp6_e2m3": ml_dtypes.float6_e2m3fn,
    "mxfp6_e3m2": ml_dtypes.float6_e3m2fn,
    "mxfp8_e4m3": ml_dtypes.float8_e4m3fn,
}
MXFP4 = GGMLQuantizationType.MXFP4


def roundtrip(x, fmt):
    return lowbit.quantize(torch.as_tensor(x, dtype=torch.float32), fmt).dequantize()


def produced_values(fmt: str) -> torch.Tensor:
    """Finite element values the quantizer can produce, sorted (mxint8 never writes -2.0)."""
    values = [v for v in lowbit.get_format(fmt).values if math.isfinite(v)]
    if fmt == "mxint8":
        values.remove(-2.0)
    return torch.tensor(sorted(set(values)), dtype=torch.float32)


def block(*head, n=32):
    x = torch.zeros(n)
    x[: len(head)] = torch.tensor(head)
    return x


# ---- MX: hand vectors -----------------------------------------------------------------------


def test_mx_specs_and_bits_per_weight():
    for fmt, fid, bits in zip(MX, (41, 42, 43, 44, 45), (4, 6, 6, 8, 8), strict=True):
        spec = lowbit.get_format(fmt)
        assert (spec.id, spec.bits, spec.default_block_size) == (fid, bits, 32)
        assert spec.fixed_block_size and not spec.double_quant
        q = lowbit.quantize(torch.randn(8, 64), fmt)
        assert q.bits_per_weight == bits + 8 / 32
        assert q.parts["scales_e8m0"].dtype == torch.uint8 and q.parts["scales_e8m0"].shape == (16,)
    assert lowbit.quantize(torch.randn(4, 32), "mxfp4").bits_per_weight == 4.25  # docs/formats.md#bits-per-weight
    with pytest.raises(ValueError, match="has a fixed block of 32 weights"):
        lowbit.quantize(torch.randn(64), "mxfp4", block_size=64)


def test_mxfp4_amax_6_has_scale_exponent_0():
    x = block(6.0, -3.0, 1.5, 0.5, -0.5, 4.0, 2.0)
    q = lowbit.quantize(x, "mxfp4")
    assert q.parts["scales_e8m0"].tolist() == [127]  # floor(log2 6) - 2 = 0 -> 2^0
    assert torch.equal(q.dequantize(), x)


def test_mxfp4_amax_7_saturates():
    x = block(7.0, -6.9, 5.0, 3.5, 0.75)
    q = lowbit.quantize(x, "mxfp4")
    assert q.parts["scales_e8m0"].tolist() == [127]  # floor(log2 7) - 2 = 0: 7 does not fit
    assert q.dequantize()[:5].tolist() == [6.0, -6.0, 4.0, 4.0, 1.0]  # saturate; ties to even


def test_mx_all_zero_block():
    for fmt in MX:
        x = torch.zeros(2, 32)
        x[1] = torch.randn(32)
        q = lowbit.quantize(x, fmt)
        assert q.parts["scales_e8m0"][0].item() == 0  # smallest exponent, 2^-127; never NaN (0xFF)
        out = q.dequantize()
        assert not out.isnan().any() and (out[0] == 0).all() and (out[1] != 0).any()


def test_mxfp4_one_huge_and_many_tiny():
    x = torch.full((32,), 1e-3)
    x[0], x[1], x[2] = 1024.0, -100.0, 40.0
    q = lowbit.quantize(x, "mxfp4")
    assert q.parts["scales_e8m0"].tolist() == [127 + 8]  # floor(log2 1024) - 2 = 8: X = 256
    out = q.dequantize()
    # 1024/256 = 4; -100/256 = -0.39 -> -0.5; 40/256 = 0.156 -> 0; the tiny ones -> 0
    assert out[:3].tolist() == [1024.0, -128.0, 0.0] and (out[3:] == 0).all()


def test_mx_other_elements_hand_vectors():
    # E4M3: amax 448 -> 2^(8 - 8) = 1; E3M2: amax 28 -> 2^(4 - 4); E2M3: amax 7.5 -> 2^(2 - 2)
    for fmt, top in (("mxfp8_e4m3", 448.0), ("mxfp6_e3m2", 28.0), ("mxfp6_e2m3", 7.5)):
        q = lowbit.quantize(block(top, -top / 2, 1.0), fmt)
        assert q.parts["scales_e8m0"].tolist() == [127], fmt
        assert q.dequantize()[:3].tolist() == [top, -top / 2, 1.0]
    # MXINT8: amax 1.5 -> 2^(0 - 0); k/64 with k = round(64 x), ties to even, saturating at 127/64
    x = block(1.5, 1 / 128, 3 / 128, -3 / 128, 1.99, 0.3)
    q = lowbit.quantize(x, "mxint8")
    assert q.parts["scales_e8m0"].tolist() == [127]
    assert q.dequantize()[:6].tolist() == [1.5, 0.0, 2 / 64, -2 / 64, 127 / 64, 19 / 64]
    codes = q.parts["codes"][:4].tolist()
    assert codes == [96, 0, 2, 254]  # two's complement bytes
    q = lowbit.quantize(block(1.99, -1.999), "mxint8")  # amax < 2: X = 1, saturate at +-127/64
    assert q.dequantize()[:2].tolist() == [127 / 64, -127 / 64]


def test_mxfp4_ties_to_even():
    x = block(6.0, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -3.5)
    assert roundtrip(x, "mxfp4")[:10].tolist() == [6, 0, 1, 1, 2, 2, 4, 4, -1, -4]


def test_mx_codes_are_packed_high_bits_first():
    x = block(6.0, -0.5, 1.0)
    q = lowbit.quantize(x, "mxfp4")
    assert q.parts["codes"][:2].tolist() == [(0x7 << 4) | 0x9, 0x2 << 4]  # E2M1 codes 7, 9, 2, 0


# ---- MX: against references -----------------------------------------------------------------


def _mx_reference(x: np.ndarray, fmt: str) -> np.ndarray:
    """OCP MX v1.0 §6.3 with ml_dtypes: X = 2^(floor(log2 amax) - emax), saturating RNE cast."""
    b = x.reshape(-1, 32).astype(np.float32)
    amax = np.abs(b).max(axis=1, keepdims=True)
    _, e = np.frexp(amax)
    exp = np.where(amax > 0, e - 1 - EMAX[fmt], -127).clip(-127, 127)
    scale = np.ldexp(np.float64(1), exp)
    dt = ML_ELEMENT[fmt]
    top = float(ml_dtypes.finfo(dt).max)
    elem = np.clip(b / scale, -top, top).astype(dt).astype(np.float64)
    return (elem * scale).astype(np.float32).reshape(x.shape)


@pytest.mark.parametrize("fmt", list(ML_ELEMENT))
def test_mx_equals_ml_dtypes_reference(fmt):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 96)) * np.exp2(rng.uniform(-20, 20, (64, 1)))).astype(np.float32)
    x[3, :32] = 0
    assert np.array_equal(roundtrip(x, fmt).numpy(), _mx_reference(x, fmt))


@pytest.mark.parametrize("shape", [(32,), (4, 64), (3, 160), (16, 256), (2, 3, 128)])
def test_mxfp4_equals_gguf(shape):
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(rng.uniform(1e-3, 1e3))
    x = x * np.exp2(rng.integers(-8, 8, (*shape[:-1], 1))).astype(np.float32)
    ref_bytes = gguf_quantize(x, MXFP4)
    ref = gguf_dequantize(ref_bytes, MXFP4).reshape(shape)
    q = lowbit.quantize(torch.from_numpy(x), "mxfp4")
    assert np.array_equal(q.dequantize().numpy(), ref)
    # byte for byte: scale byte = GGUF e; codes = GGUF nibbles (element j low, j + 16 high)
    blocks = ref_bytes.reshape(-1, 17)
    assert np.array_equal(q.parts["scales_e8m0"].numpy(), blocks[:, 0])
    codes = unpack_codes(q.parts["codes"], 4, x.size).numpy().reshape(-1, 2, 16)
    assert np.array_equal(codes[:, 0] | (codes[:, 1] << 4), blocks[:, 1:])


def test_mxfp4_where_gguf_differs():
    """Pinned differences between OCP (lowbit) and gguf/llama.cpp MXFP4 quantization."""
    # 1. Ties: gguf takes the first least-error index of kvalues, i.e. the smaller magnitude.
    x = block(6.0, 0.75, 1.75, 3.5, -0.75, 0.25, 2.5).numpy()
    ggml = gguf_dequantize(gguf_quantize(x, MXFP4), MXFP4)
    assert ggml[:7].tolist() == [6, 0.5, 1.5, 3, -0.5, 0, 2]
    assert roundtrip(x, "mxfp4")[:7].tolist() == [6, 1, 2, 4, -1, 0, 2]
    # 2. Exponent: float32 log2f(8 - ulp) rounds to 3.0, so gguf picks X = 2 where OCP's
    #    floor(log2 amax) = 2 gives X = 1 (and 7.9999995 saturates to 6).
    x = block(float(np.nextafter(np.float32(8), np.float32(0))), 1.0).numpy()
    assert gguf_quantize(x, MXFP4)[0] == 127 + 1
    q = lowbit.quantize(torch.from_numpy(x), "mxfp4")
    assert q.parts["scales_e8m0"].tolist() == [127]
    assert q.dequantize()[:2].tolist() == [6.0, 1.0]
    # 3. amax < 2^-125: gguf's uint8 exponent wraps around; OCP clamps to 2^-127 (code 0).
    q = lowbit.quantize(block(2.0**-126, -(2.0**-127)), "mxfp4")
    assert q.parts["scales_e8m0"].tolist() == [0]
    assert q.dequantize()[:2].tolist() == [2.0**-126, -(2.0**-127)]


# ---- properties, every MX format ------------------------------------------------------------


@pytest.mark.parametrize("fmt", MX)
def test_mx_representable_values_roundtrip_exactly(fmt):
    values = produced_values(fmt)
    top = values.abs().max()
    pad = (-values.numel()) % 31
    vals = torch.cat([values, torch.zeros(pad)]).view(-1, 31)
    x = torch.cat([torch.full((vals.shape[0], 1), top.item()), vals], dim=1)  # every block holds the max
    for k in (0, -7, 5, -120, 100):
        xs = x * 2.0**k
        q = lowbit.quantize(xs, fmt)
        assert (q.parts["scales_e8m0"] == 127 + k).all()
        assert torch.equal(q.dequantize(), xs), (fmt, k)


@pytest.mark.parametrize("fmt", MX)
def test_mx_error_is_at_most_half_a_step(fmt):
    torch.manual_seed(0)
    x = (torch.randn(64, 64) * torch.exp2(torch.randint(-10, 10, (64, 1)).float())).reshape(-1, 32)
    q = lowbit.quantize(x, fmt)
    out = q.dequantize()
    scale = e8m0_decode(q.parts["scales_e8m0"])
    grid = scale[:, None] * produced_values(fmt)[None, :]  # (blocks, values)
    nearest = (x[:, :, None] - grid[:, None, :]).abs().amin(dim=2)
    err = (out - x).abs()
    assert torch.equal(err, nearest)  # scaling by a power of two is exact: the nearest, exactly
    inside = x.abs() <= grid.amax(dim=1, keepdim=True)  # saturated elements err more
    gaps = (grid[:, 1:] - grid[:, :-1]).amax(dim=1, keepdim=True).expand_as(x)
    assert (err[inside] <= gaps[inside] / 2).all()


# ---- NVFP4 ----------------------------------------------------------------------------------


def test_nvfp4_hand_vector():
    x = torch.zeros(3, 16)
    x[0, :5] = torch.tensor([42.0, -21.0, 10.5, 3.5, 1.0])  # tensor amax 42: g = 42 / 2688 = 2^-6
    x[1, :3] = torch.tensor([4.2, -2.0, 0.3])  # 4.2 / 6 / g = 44.8 -> E4M3 44 (rounds down)
    q = lowbit.quantize(x, "nvfp4")
    assert q.parts["tensor_scale"].tolist() == [2.0**-6]
    # 448 = 0x7E; 44 = 1.375 * 2^5 = 0b1100_011; the all-zero block clamps to 2^-6 = 0x08 (torchao)
    assert q.parts["scales_e4m3"].tolist() == [0x7E, 0x63, 0x08]
    out = q.dequantize()
    # block 0: total scale 448 * 2^-6 = 7: 42 = 6*7, -21 = -3*7, 10.5 = 1.5*7, 3.5 = 0.5*7, 1/7 -> 0
    assert out[0, :5].tolist() == [42.0, -21.0, 10.5, 3.5, 0.0]
    # block 1: total 44/64 = 0.6875; 4.2/0.6875 = 6.11 saturates at 6; -2/0.6875 = -2.9 -> -3
    assert out[1, :3].tolist() == [6 * 0.6875, -3 * 0.6875, 0.5 * 0.6875]
    assert (out[2] == 0).all()


def test_nvfp4_spec_and_bits_per_weight():
    spec = lowbit.get_format("nvfp4")
    assert (spec.id, spec.bits, spec.default_block_size, spec.fixed_block_size) == (46, 4, 16, True)
    for n in (16, 256, 4096):
        q = lowbit.quantize(torch.randn(n), "nvfp4")
        assert q.bits_per_weight == 4.5 + 32 / n  # 4 + 8/16, plus one fp32 per tensor
        assert q.parts["tensor_scale"].dtype == torch.float32 and q.parts["tensor_scale"].numel() == 1


def test_nvfp4_all_zero_tensor():
    q = lowbit.quantize(torch.zeros(64), "nvfp4")
    out = q.dequantize()
    assert not out.isnan().any() and (out == 0).all()


def _nvfp4_reference(x: torch.Tensor) -> torch.Tensor:
    """torchao nvfp4_quantize (two-level) + NVFP4Tensor.to_dtype, with torch's E4M3 cast and
    ml_dtypes' E2M1 cast (both round half to even)."""
    g = x.abs().amax().float() / (448.0 * 6.0)
    b = x.float().reshape(-1, 16)
    s = torch.clamp(b.abs().amax(dim=1) / 6.0 / g, min=2.0**-6, max=448.0).to(torch.float8_e4m3fn)
    total = g * s.float()
    data = torch.clamp(b / total[:, None], -6.0, 6.0)
    e2m1 = torch.from_numpy(data.numpy().astype(ml_dtypes.float4_e2m1fn).astype(np.float32))
    return (e2m1 * total[:, None]).reshape(x.shape)


def test_nvfp4_equals_torchao_recipe():
    torch.manual_seed(0)
    x = torch.randn(64, 128) * torch.exp2(torch.randint(-12, 4, (64, 1)).float())
    x[5, :16] = 0
    assert torch.equal(lowbit.quantize(x, "nvfp4").dequantize(), _nvfp4_reference(x))


def test_nvfp4_representable_values_roundtrip_exactly():
    # Exact only where g * s is exact: every block's max 6 * 7 * 2^k makes g = 2^(k-6), s = 448.
    values = produced_values("mxfp4")  # the E2M1 values
    x = torch.cat([values, torch.tensor([6.0])]).view(-1, 16) * 7
    for k in (0, -9, 7):
        xs = x * 2.0**k
        assert torch.equal(lowbit.quantize(xs, "nvfp4").dequantize(), xs)


def test_nvfp4_error_is_at_most_half_a_step():
    torch.manual_seed(1)
    x = (torch.randn(64, 64) * torch.exp2(torch.randint(-6, 6, (64, 1)).float())).reshape(-1, 16)
    q = lowbit.quantize(x, "nvfp4")
    out = q.dequantize()
    total = q.parts["tensor_scale"] * e4m3_decode(q.parts["scales_e4m3"])
    grid = total[:, None] * produced_values("mxfp4")[None, :]
    nearest = (x[:, :, None] - grid[:, None, :]).abs().amin(dim=2)
    err = (out - x).abs()
    assert (err <= nearest * (1 + 1e-6) + 1e-12).all()
    inside = x.abs() <= grid.amax(dim=1, keepdim=True)
    gaps = (grid[:, 1:] - grid[:, :-1]).amax(dim=1, keepdim=True).expand_as(x)
    assert (err[inside] <= gaps[inside] / 2 * (1 + 1e-6)).all()
