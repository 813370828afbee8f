"""formats.registry: lookups, and require_grid's one message for every caller that needs a grid."""

from __future__ import annotations

import pytest

from lowbit.errors import InputError
from lowbit.formats.registry import GridCodec, codec_for, formats, get_format, require_grid


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
