"""formats.registry: lookups, require_grid's one message for every caller that needs a grid, and table_form: the
(table, factor, zero) the fused kernels decode with gives decode's floats."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.errors import InputError
from lowbit.formats.registry import GridCodec, codec_for, formats, get_format, require_grid
from lowbit.scaling import double_quant
from lowbit.scaling.packing import unpack_codes


def test_require_grid_returns_the_codec_of_every_grid_format():
    grid = [name for name in formats() if issubclass(codec_for(get_format(name)), GridCodec)]
    assert {"int4", "nf4", "fp4_e2m1", "mxfp4", "nvfp4", "qq4", "ternary"} <= set(grid)
    for name in grid:
        assert require_grid(get_format(name), "unused") is codec_for(get_format(name))


@pytest.mark.parametrize(("name", "kind"), [("q4_0", "a GGUF block format"), ("q6_k", "a GGUF block format"),
                                            ("fp16", "a plain cast")])
def test_require_grid_says_why_and_what_the_format_is_instead(name, kind):
    with pytest.raises(InputError, match=f"^GPTQ needs a grid; {name} is {kind}"):
        require_grid(get_format(name), "GPTQ needs a grid")


GRID = [f for f in formats() if issubclass(codec_for(get_format(f)), GridCodec)]


@pytest.mark.parametrize("fmt", GRID)
@pytest.mark.parametrize("dq", [False, True])
def test_table_form_decodes_like_decode(fmt, dq):
    spec = get_format(fmt)
    if dq and not spec.double_quant:
        pytest.skip("no double quant for this format")
    torch.manual_seed(spec.id)
    x = torch.randn(4, 300) * torch.rand(4, 1)
    search = "hqq" if fmt == "int4_asym" else None  # a float16 zero point
    q = lowbit.quantize(x, fmt, double_quant=dq, search=search)
    parts = dict(q.parts)
    if dq:
        parts["scales"] = double_quant.decompress(parts)
    form = codec_for(spec).table_form(spec, parts)
    assert form is not None
    table, factor, zero = form
    codes = unpack_codes(parts["codes"], spec.bits, x.numel()).to(torch.int64)
    block = torch.arange(x.numel()) // q.block_size
    level = table[codes] if zero is None else table[codes] - zero[block]
    got = level * factor.reshape(-1)[block]
    ref = q.dequantize(torch.float32, kernels="reference").reshape(-1)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))
