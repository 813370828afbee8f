"""The golden table (scripts/golden.py): saved bytes and measured KL of 12 runs, recorded before issue 26's refactor.

``pytest -m slow tests/test_golden_outputs.py`` (about 25 minutes on 2 cores) reruns every run through the CLI and
asserts each sha256 and KL is what was recorded: a refactor that changes a saved byte or a measured number fails.
"""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _golden():
    spec = importlib.util.spec_from_file_location("golden", ROOT / "scripts" / "golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


EXPECTED = json.loads((ROOT / "tests" / "golden" / "outputs.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("name", list(EXPECTED))
def test_golden_run_is_unchanged(name):
    (measured,) = _golden().measure([name], log=lambda line: None).values()
    assert measured == EXPECTED[name]


def test_the_table_covers_the_issue_26_list():
    assert set(EXPECTED) == set(_golden().runs())
