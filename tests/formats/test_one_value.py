"""`lowbit bits`' rounding of one element (lowbit.formats.one_value, no torch) is the codecs' ``encode``."""

import pytest
import torch

from lowbit.formats import formats, get_format
from lowbit.formats.one_value import ONE_SCALE_FAMILIES, encode_one, explains, float32_of
from lowbit.formats.registry import GridCodec, codec_for


def one_scale(name: str) -> bool:
    """The rule `lowbit bits` used with the codecs: one level table, one block scale."""
    spec = get_format(name)
    codec = codec_for(spec)
    return issubclass(codec, GridCodec) and spec.values is not None and codec.SCALE_PARTS == ("scales",)


def test_explains_the_formats_with_one_level_table_and_one_scale():
    assert [n for n in formats() if explains(get_format(n))] == [n for n in formats() if one_scale(n)]
    assert {get_format(n).family for n in formats() if one_scale(n)} == set(ONE_SCALE_FAMILIES)


def probes(spec) -> torch.Tensor:
    """Thousands of float32 values: random at several scales, every level and midpoint and their neighbours,
    zeros, the float32 extremes."""
    g = torch.Generator().manual_seed(spec.id)
    finite = torch.tensor([v for v in spec.values if v == v and abs(v) != float("inf")], dtype=torch.float32)
    s = finite.sort().values
    mids = (s[:-1] + s[1:]) / 2
    edges = torch.cat([finite, mids, -mids, s * 1.5, s * 0.25])
    near = torch.cat([edges, torch.nextafter(edges, torch.tensor(float("inf"))),
                      torch.nextafter(edges, torch.tensor(float("-inf")))])
    top = float(finite.abs().max())
    randoms = [torch.randn(2000, generator=g) * top * k for k in (0.01, 0.3, 1.0, 3.0)]
    fmax = torch.finfo(torch.float32).max
    special = torch.tensor([0.0, -0.0, fmax, -fmax, 1e-45, -1e-45, 1e-38, 1e30, -1e30])
    return torch.cat([near, *randoms, special])


@pytest.mark.parametrize("name", [n for n in formats() if one_scale(n)])
def test_encode_one_is_the_codec_encode(name):
    spec = get_format(name)
    x = probes(spec)
    codes = codec_for(spec).encode(spec, x[:, None], {"scales": torch.ones(x.numel())})[:, 0].tolist()
    got = [encode_one(spec, v) for v in x.tolist()]
    wrong = [(v, c, g) for v, c, g in zip(x.tolist(), codes, got, strict=True) if c != g]
    assert not wrong, f"{name}: {len(wrong)} of {x.numel()} differ, e.g. (value, codec, encode_one) {wrong[:5]}"


def test_float32_of_is_torchs_rounding():
    for v in [0.1, 1 / 3, 3.4028235677973366e38, -3.4028235e38, 1e-46, 2.0**-149 * 0.5, 2.0**-149 * 0.75, 1e39]:
        assert float32_of(v) == torch.tensor(v, dtype=torch.float32).item(), v
