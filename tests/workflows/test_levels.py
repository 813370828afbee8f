"""lowbit.workflows.levels: a layer's weight rounded to each label, and the levels of its median block."""

from itertools import pairwise

import pytest
import torch

from lowbit.formats import get_format
from lowbit.workflows.levels import block_levels


def test_block_levels_take_the_median_absmax_block_and_its_scale():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * 0.02
    blocks = w.reshape(-1, 64).abs().amax(1)
    b = int(blocks.argsort()[blocks.numel() // 2])
    nf4 = block_levels(w, "nf4")
    assert nf4["block"] == b and nf4["absmax"] == pytest.approx(float(blocks[b]))
    expected = sorted(v * float(blocks[b]) for v in get_format("nf4").values)
    assert nf4["levels"] == pytest.approx(expected, rel=1e-6)
    int4 = block_levels(w, "int4")
    steps = [y - x for x, y in pairwise(int4["levels"])]
    assert len(int4["levels"]) == 15 and max(steps) == pytest.approx(min(steps), rel=1e-5)
    assert int4["levels"][-1] == pytest.approx(float(blocks[b]))
    nf = nf4["levels"]  # packed near zero: the middle step is the smallest
    assert nf[8] - nf[7] < nf[1] - nf[0]
    qq4 = block_levels(w, "qq4")
    assert len(qq4["levels"]) == 16 and max(map(abs, qq4["levels"])) <= qq4["absmax"] * (1 + 1e-6)
    q4_0 = block_levels(w, "q4_0")  # GGUF: the block's own fp16 d, levels (q - 8) * d
    steps = [y - x for x, y in pairwise(q4_0["levels"])]
    assert len(q4_0["levels"]) == 16 and max(steps) == pytest.approx(min(steps), rel=1e-3)
    assert len(block_levels(w, "q4_k")["levels"]) == 16
    assert block_levels(w, "nf4+dq")["bits_per_weight"] < nf4["bits_per_weight"]
    with pytest.raises(ValueError, match="on its own"):
        block_levels(w, "nf4+gptq")
