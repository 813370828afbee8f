"""A format's anatomy (what `lowbit formats` explains): a GGUF block's field table is the block the codec stores."""

import pytest
import torch

import lowbit
from lowbit import get_format, quantize
from lowbit.formats.spec import anatomy


@pytest.mark.parametrize("name", [n for n in lowbit.formats() if anatomy(get_format(n)).gguf_block])
def test_gguf_fields_fill_the_stored_block(name):
    spec, a = get_format(name), anatomy(get_format(name))
    q = quantize(torch.randn(4, 512), name)
    assert q.parts["data"].shape[1] == a.block_bytes  # ggml-common.h sizeof(block_*)
    if "bytes" in dict(spec.params):
        assert a.block_bytes == spec.param("bytes")
