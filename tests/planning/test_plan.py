"""QuantPlan: rules from JSON and back, first match wins, keep, fallbacks, one-line errors."""

import copy
import json
from collections import OrderedDict

import pytest
import torch
from torch import nn

from lowbit.errors import LayerQuantizeError
from lowbit.layers import QuantLinear, quantize_model
from lowbit.planning import PlanRule, QuantConfig, QuantPlan

PLAN = {"rules": [{"pattern": "head", "keep": True},
                  {"pattern": "mlp.*", "format": "q4_k", "fallback": "q8_0"},
                  {"pattern": "*", "format": "nf4/32+dq@mse"}]}


def model() -> nn.Module:
    torch.manual_seed(0)
    mlp = nn.Sequential(OrderedDict(up=nn.Linear(256, 64), down=nn.Linear(64, 256)))
    return nn.Sequential(OrderedDict(proj=nn.Linear(256, 256), mlp=mlp, head=nn.Linear(256, 8)))


def test_json_round_trip(tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(PLAN))
    plan = QuantPlan.load(path)
    assert plan.to_dict() == PLAN and QuantPlan.from_dict(plan.to_dict()) == plan
    assert plan.label == "plan[q4_k|q8_0, nf4/32+dq@mse]" and not plan.needs_calibration


def test_first_match_wins_keep_and_fallback():
    m = model()
    report = quantize_model(m, QuantPlan.from_dict(PLAN), progress=False)
    assert isinstance(m.head, nn.Linear) and not isinstance(m.head, QuantLinear)
    assert m.mlp.up.qweight.format.name == "q4_k"  # 256 inputs: whole 256-weight rows
    assert m.mlp.down.qweight.format.name == "q8_0"  # 64 inputs cannot hold a q4_k block: the fallback
    assert m.proj.qweight.format.name == "nf4" and m.proj.qweight.double_quant
    assert report.fallbacks == (("mlp.down", "q4_k"),)
    assert report.format_counts == {"nf4/32+dq@mse": 1, "q4_k": 1, "q8_0": 1}
    stored = sum(mod.qweight.nbytes for mod in m.modules() if isinstance(mod, QuantLinear))
    assert report.layer_bytes_after == stored  # the fallback's bytes are what is counted


def test_a_config_and_its_plan_store_the_same_bytes():
    config = QuantConfig.parse("int4/32")
    a, b = model(), model()
    ra = quantize_model(a, QuantPlan.uniform(config, exclude=("head",)), progress=False)
    rb = quantize_model(b, QuantPlan((PlanRule("head", None), PlanRule("*", config))), progress=False)
    assert ra.format == "int4" and rb.format == "plan[int4/32]" and ra.layers == rb.layers
    for x, y in zip(a.modules(), b.modules(), strict=True):
        if isinstance(x, QuantLinear):
            assert all(torch.equal(x.qweight.parts[k], y.qweight.parts[k]) for k in x.qweight.parts)


def test_a_shape_the_format_cannot_hold_without_fallback_names_the_layer():
    m = model()
    before = copy.deepcopy(m.state_dict())
    with pytest.raises(LayerQuantizeError, match="mlp.down"):
        quantize_model(m, QuantPlan.from_dict({"rules": [{"pattern": "*", "format": "q4_k"}]}), progress=False)
    assert not any(isinstance(mod, QuantLinear) for mod in m.modules())  # untouched
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_a_plan_that_quantizes_nothing_says_what_layers_are_called():
    with pytest.raises(ValueError, match=r"quantizes no nn.Linear layer .*named like proj, mlp.up"):
        quantize_model(model(), QuantPlan.from_dict({"rules": [{"pattern": "attn.*", "format": "nf4"}]}))


@pytest.mark.parametrize(("plan", "message"), [
    ({"rules": []}, "at least one rule"),
    ({"rules": [{"pattern": "*"}]}, "either 'format'"),
    ({"rules": [{"pattern": "*", "format": "nf4", "keep": True}]}, "either 'format'"),
    ({"rules": [{"pattern": "*", "format": "nf9"}]}, "rule 1: .*nf9"),
    ({"rules": [{"pattern": "*", "format": "nf4", "fallbak": "q8_0"}]}, "unknown key 'fallbak'"),
    ({"rules": [{"pattern": "", "format": "nf4"}]}, "non-empty module-name pattern"),
    ({"rules": [{"pattern": "x", "keep": True, "fallback": "q8_0"}]}, "a fallback means nothing"),
    ({"rules": [{"pattern": "*", "format": 4}]}, "is a string"),
    ([{"pattern": "*", "format": "nf4"}], "an object"),
])
def test_bad_plans_are_one_line_errors(plan, message, tmp_path):
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    with pytest.raises(ValueError, match=message) as e:
        QuantPlan.load(path)
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_unreadable_plans(tmp_path):
    with pytest.raises(ValueError, match="cannot read plan"):
        QuantPlan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{rules:")
    with pytest.raises(ValueError, match="not valid JSON"):
        QuantPlan.load(tmp_path / "bad.json")


def test_rules_that_match_no_layer_are_named_with_the_closest_names():
    plan = QuantPlan.from_dict({"rules": [{"pattern": "mlp.dwn", "format": "nf4"}, {"pattern": "*", "format": "int8"}]})
    names = [n for n, mod in model().named_modules() if isinstance(mod, nn.Linear)]
    (message,) = plan.unused(names)
    assert message.startswith("plan rule 'mlp.dwn' matches no nn.Linear layer; closest names: ")
    assert "mlp.down" in message
