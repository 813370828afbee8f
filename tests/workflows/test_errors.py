"""lowbit.workflows.errors.measure: each weight's errors per format, checked against an independent computation
(the command around it: tests/commands/test_errors_cmd.py)."""

import math

import pytest
import torch
from torch import nn

from lowbit.planning import QuantPlan
from lowbit.workflows.errors import measure

from .helpers import sqnr_db


def test_value_a_format_cannot_hold_names_the_layer():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(64, 4), nn.Linear(64, 4)

    model = Two()
    with torch.no_grad():
        model.b.weight[2, 37] = 6e5  # q4_0's fp16 scale would be -75000: past fp16 (tests/test_representable.py)
    report = measure(model, [QuantPlan.uniform("nf4"), QuantPlan.uniform("q4_0")], progress=False)
    nf4, q4_0 = report["formats"]
    assert len(nf4["layers"]) == 2 and math.isfinite(nf4["mean_sqnr_db"])
    assert q4_0["error"].startswith("layer 'b' (weight 4x64): q4_0 cannot hold block")


def test_embedded_smollm2_blocks_match_tensor_errors(smollm2):
    """Real weights: block 0 of the embedded SmolLM2, nf4 and int4, against numpy."""
    model = smollm2[0]
    plans = [QuantPlan.uniform(label, include=("model.layers.0.*",)) for label in ("nf4", "int4")]
    report = measure(model, plans, progress=False)
    assert len(report["layers"]) == 7
    modules = dict(model.named_modules())
    for f in report["formats"]:
        for layer, errs in zip(report["layers"], f["layers"], strict=True):
            assert errs["sqnr_db"] == pytest.approx(sqnr_db(modules[layer["name"]].weight, f["format"]), abs=1e-9)
    print({f["format"]: round(f["mean_sqnr_db"], 2) for f in report["formats"]})
