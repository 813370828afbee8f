"""A format's anatomy (what `lowbit formats` explains): each codec describes every format of its family, and a
GGUF block's field table is the block the codec stores."""

import pytest
import torch

import lowbit
from lowbit import get_format, quantize
from lowbit.formats.registry import codec_for
from lowbit.formats.spec import anatomy
from lowbit.gguf.legacy import GGUFLegacy


@pytest.mark.parametrize("name", lowbit.formats())
def test_every_format_is_described_by_its_codec(name):
    a = anatomy(get_format(name))
    fields = [w for f in a.fields for w in (f.holds, f.dtype, f.entries)]
    unfilled = [w for w in (a.scales, a.rule, a.fixed_by, a.no_double_quant, *fields) if "{" in w or "}" in w]
    assert a.fields and unfilled == []


def test_gguf_legacy_describes_exactly_its_formats():
    assert set(GGUFLegacy.ANATOMIES) == {n for n in lowbit.formats() if codec_for(get_format(n)) is GGUFLegacy}


@pytest.mark.parametrize("name", [n for n in lowbit.formats() if anatomy(get_format(n)).gguf_block])
def test_gguf_fields_fill_the_stored_block(name):
    spec, a = get_format(name), anatomy(get_format(name))
    q = quantize(torch.randn(4, 512), name)
    assert q.parts["data"].shape[1] == a.block_bytes  # ggml-common.h sizeof(block_*)
    if "bytes" in dict(spec.params):
        assert a.block_bytes == spec.param("bytes")
