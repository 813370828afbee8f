"""The bits per weight counted from the format facts (no torch) are those the codecs store."""

import pytest

from lowbit.formats import formats, get_format
from lowbit.formats.facts import bits_per_weight, probe
from lowbit.formats.probe import stored
from lowbit.planning.config import QuantConfig


def _labels():
    for name in formats():
        spec = get_format(name)
        yield name, None, False
        if spec.double_quant:
            yield name, None, True
        if not spec.fixed_block_size:
            yield name, 32, False
            yield name, 4096, spec.double_quant  # a large block: the probe grows to hold 16 of them


@pytest.mark.parametrize(("name", "block", "dq"), list(_labels()))
def test_facts_count_what_the_codec_stores(name, block, dq):
    label = name + (f"/{block}" if block else "") + ("+dq" if dq else "")
    measured = stored(probe(QuantConfig.parse(label))).bits_per_weight
    assert bits_per_weight(name, block, double_quant=dq) == measured, label
