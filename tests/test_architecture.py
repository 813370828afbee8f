"""docs/architecture.md's worked examples run as written: a format, a method and a command, each added without
editing an existing module (the registries are restored afterwards)."""

import re
import sys
import types
from pathlib import Path

import pytest
import torch

from lowbit import cli
from lowbit.formats import registry as formats_registry
from lowbit.methods import registry as methods_registry

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def example(section: str) -> str:
    """The python block under the doc's ``## {section}`` heading."""
    text = DOC.read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", body, re.S)
    return code


@pytest.fixture
def sandbox(monkeypatch):
    """Registries as they are now, restored after the test: what an example registers is forgotten."""
    formats_registry.formats()  # every format registered first, so the restored table is whole
    monkeypatch.setattr(formats_registry, "_FORMATS", dict(formats_registry._FORMATS))
    monkeypatch.setattr(formats_registry, "_IDS", dict(formats_registry._IDS))
    monkeypatch.setattr(methods_registry, "_REGISTERED", dict(methods_registry._REGISTERED))


def test_a_format_added_at_run_time_quantizes_and_takes_every_suffix(sandbox):
    weight = torch.randn(64, 128)
    scope = {"weight": weight}
    exec(example("How to add a format"), scope)
    q, plan = scope["q"], scope["plan"]
    assert q.format.name == "log3" and plan.label == "log3/64+dq"
    levels = {-1.0, -0.5, -0.25, -0.125, 0.0, 0.25, 0.5, 1.0}
    blocks = q.dequantize().reshape(-1, 32) / weight.reshape(-1, 32).abs().amax(1, keepdim=True)
    assert set(blocks.unique().tolist()) <= levels


def test_a_method_added_in_one_module_runs_through_compare(sandbox, tiny_lm_dir):
    from lowbit.evaluate import compare
    from lowbit.models import load_model
    from lowbit.planning import QuantPlan

    exec(example("How to add a method"), {})
    model, tokenizer, info = load_model(str(tiny_lm_dir))
    plans = [QuantPlan.uniform("nf4"), QuantPlan.uniform("nf4+clip")]
    plain, clipped = compare(model, tokenizer, info, plans, window=64, windows=1, progress=False)["results"]
    assert clipped["format"] == "nf4+clip" and clipped["bits_per_weight"] == plain["bits_per_weight"]
    assert clipped["kl_mean"] != plain["kl_mean"]  # the clipped weights are what was rounded


def test_a_command_added_in_one_module_runs(monkeypatch, capsys):
    module = types.ModuleType("lowbit.commands.needs_cmd")
    exec(example("How to add a command"), module.__dict__)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(cli, "COMMANDS", (*cli.COMMANDS, ("needs", "needs_cmd", "what calibration a label's "
                                                                              "methods ask for")))
    assert cli.main(["needs", "nf4/32+awq+gptq@amse"]) == 0
    assert capsys.readouterr().out == "+awq: block, +gptq: hessian\n"
