"""The level tables computed without torch (lowbit.formats.levels, .catalog) are the torch codecs' to the bit."""

import struct

import pytest
import torch
from scipy.special import ndtri

from lowbit.formats import formats, get_format
from lowbit.formats.codebooks import codebook_table
from lowbit.formats.levels import BNB_FP4_VALUES, MXINT8_VALUES, NF_DELTA, linspace32, normal_float_values
from lowbit.formats.minifloat import exmy_of
from lowbit.formats.mx import ELEMENTS
from lowbit.formats.registry import GridCodec, codec_for


def bits32(values) -> list[int]:
    """Each value's float32 bit pattern: tells -0 from +0, one NaN from another."""
    return [struct.unpack("<I", struct.pack("<f", v))[0] for v in values]


def torch_normal_float(bits: int) -> tuple[float, ...]:
    """How lowbit computed NFk before (and bitsandbytes' create_normal_map does): float32 torch.linspace, ndtri."""
    half = 2 ** (bits - 1)
    pos = ndtri(torch.linspace(NF_DELTA, 0.5, half + 1, dtype=torch.float32)[:-1].numpy())
    neg = -ndtri(torch.linspace(NF_DELTA, 0.5, half, dtype=torch.float32)[:-1].numpy())
    v = torch.tensor([*pos.tolist(), 0.0, *neg.tolist()], dtype=torch.float32).sort().values
    return tuple((v / v.max()).tolist())


@pytest.mark.parametrize("steps", [*range(2, 300), 1000, 4097])
def test_linspace32_is_torch_linspace(steps):
    for start, end in [(NF_DELTA, 0.5), (0.0, 1.0), (-3.7, 11.2)]:
        assert bits32(linspace32(start, end, steps)) == bits32(torch.linspace(start, end, steps).tolist())


@pytest.mark.parametrize("bits", range(2, 9))
def test_normal_float_is_the_torch_computation(bits):
    assert bits32(normal_float_values(bits)) == bits32(torch_normal_float(bits))


def test_bnb_fp4_and_mxint8_are_float32_tables():
    magnitudes = [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0]
    expected = torch.tensor([m / 12 for m in magnitudes] + [0.0 - m / 12 for m in magnitudes]).float().tolist()
    assert bits32(BNB_FP4_VALUES) == bits32(expected)
    int8 = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.int8)  # two's complement bytes
    assert tuple((int8.to(torch.float32) / 64).tolist()) == MXINT8_VALUES


@pytest.mark.parametrize("name", formats())
def test_registered_levels_are_what_the_codec_decodes(name):
    """Every format's ``values`` (registered without torch) against the table its codec decodes with."""
    spec = get_format(name)
    codec = codec_for(spec)
    if spec.values is None:
        assert spec.family in ("learned", "cast", "gguf_legacy", "gguf_q4_k", "gguf_q6_k")
        return
    assert issubclass(codec, GridCodec)
    if spec.family == "codebook":
        table = codebook_table(spec)[0]
    elif spec.family == "minifloat":
        table = exmy_of(spec).value_tensor
    elif spec.family == "mx":
        table = ELEMENTS[spec.param("element")][0].value_tensor
    elif spec.family == "nvfp4":
        table = codec.decode(spec, torch.arange(16, dtype=torch.uint8)[None], {"tensor_scale": torch.ones(1),
                                                                               "scales_e4m3": torch.tensor([56],
                                                                               dtype=torch.uint8)})[0]
    else:  # int, int_asym, ternary: decode with scale 1 (and zero point 0)
        n = len(spec.values)
        parts = {"scales": torch.ones(1), "zeros": torch.zeros(1, dtype=torch.uint8)}
        table = codec.decode(spec, torch.arange(n, dtype=torch.uint8)[None], parts)[0]
    assert bits32(spec.values) == bits32(table.tolist()), name
