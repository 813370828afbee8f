"""QuantConfig.parse: the one reader of FORMAT[/BLOCK][+dq] labels, and its errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit import QuantConfig, QuantLinear, get_format, quantize_model
from lowbit.planning import QuantPlan


@pytest.mark.parametrize(
    ("label", "name", "block", "dq", "canonical"),
    [
        ("nf4", "nf4", None, False, "nf4"),
        ("int4/128", "int4", 128, False, "int4/128"),
        ("nf4+dq", "nf4", None, True, "nf4+dq"),
        ("nf4/128+dq", "nf4", 128, True, "nf4/128+dq"),
        ("nf4/64+dq", "nf4", 64, True, "nf4+dq"),  # the default block is left out of the label
        ("  NF4 ", "nf4", None, False, "nf4"),  # names are case-insensitive, as get_format reads them
        ("bnb-fp4+dq", "bnb_fp4", None, True, "bnb_fp4+dq"),
        ("float4_e2m1fn/32", "fp4_e2m1", 32, False, "fp4_e2m1/32"),  # an alias
        ("q4_0/32", "q4_0", 32, False, "q4_0"),  # a fixed block may be written out
        ("ternary/7+dq", "ternary", 7, True, "ternary/7+dq"),
    ],
)
def test_labels_parse(label, name, block, dq, canonical):
    config = QuantConfig.parse(label)
    assert (get_format(config.format).name, config.block_size, config.double_quant) == (name, block, dq)
    assert config.label == canonical


@pytest.mark.parametrize("name", lowbit.formats())
def test_every_label_round_trips(name):
    spec = get_format(name)
    settings = [(None, False)]
    if not spec.fixed_block_size:
        settings.append((128, False))
    if spec.double_quant:
        settings += [(None, True), (16, True)]
    for block, dq in settings:
        config = QuantConfig(name, block_size=block, double_quant=dq)
        again = QuantConfig.parse(config.label)
        assert again.label == config.label
        assert (again.block_size or spec.default_block_size) == (block or spec.default_block_size)
        assert again.double_quant == dq


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("", r"empty format label: expected FORMAT\[/BLOCK\]\[\+dq\]"),
        ("   ", "empty format label"),
        ("+dq", r"'\+dq' names no format: write FORMAT\+dq, e\.g\. nf4\+dq"),
        ("/64", "names no format before the '/'"),
        ("nf4+DQ", r"unknown suffix '\+DQ'.*lower case.*did you mean nf4\+dq\?"),
        ("nf4+double", r"unknown suffix '\+double'; the suffixes are \+dq"),
        ("nf4+", r"nothing after '\+'"),
        ("nf4+dq+dq", r"\+dq given more than once"),
        ("nf4+dq/64", r"the block size goes before \+dq, e\.g\. nf4/128\+dq"),
        ("nf4/abc", "block size 'abc' is not a whole number of weights"),
        ("nf4/-1", "block size '-1' is not a whole number"),
        ("nf4/1.5", "block size '1.5' is not a whole number"),
        ("nf4/0", "block size 0; a block holds at least 1 weight"),
        ("nf4/", "no block size after '/'"),
        ("nf4/64/32", "one /BLOCK only"),
        ("nf44", "unknown format 'nf44'; did you mean nf4"),
        ("q4_0/64", r"q4_0 has a fixed block of 32 weights \(GGUF\); got block size 64"),
        ("q4_k/32", r"q4_k has a fixed block of 256 weights \(GGUF\)"),
        ("mxfp4/16", r"mxfp4 has a fixed block of 32 weights \(OCP MX v1\.0\)"),
        ("nvfp4/32", r"nvfp4 has a fixed block of 16 weights \(NVFP4\)"),
        # +dq refused with what the format's scales are, as `lowbit formats` describes them
        ("int4_asym+dq", r"does not apply to int4_asym: it stores an fp32 scale s and a uint8 zero point z per "
                         r"block; .*not a scale paired with a zero point"),
        ("q4_0+dq", r"does not apply to q4_0: it stores an fp16 scale d inside each 18-byte block"),
        ("mxfp4+dq", r"does not apply to mxfp4: it stores one 8-bit E8M0 power-of-two scale X per block; "
                     r".*8 bits already"),
        ("nvfp4+dq", r"does not apply to nvfp4: it stores one 8-bit E4M3 scale s per block"),
    ],
)
def test_bad_labels_say_what_is_wrong(label, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig.parse(label)


def test_the_constructor_checks_as_parse_does():
    with pytest.raises(ValueError, match=r"fixed block of 32 weights \(GGUF\)"):
        QuantConfig("q8_0", block_size=64)
    with pytest.raises(ValueError, match="does not apply to int8_asym"):
        QuantConfig("int8_asym", double_quant=True)
    with pytest.raises(ValueError, match=r"'nf4\+dq' is a format label, not a format name: use QuantConfig\.parse"):
        QuantConfig("nf4+dq")


def test_quantize_model_reads_a_label():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 64), nn.ReLU(), nn.Linear(64, 8))
    report = quantize_model(model, QuantPlan.uniform("nf4/32+dq"), progress=False)
    assert report.format == "nf4"
    q = [m.qweight for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(q) == 2 and all(t.block_size == 32 and t.double_quant for t in q)
