"""Which command wrote a result JSON, read from its shape, and the one line that describes it."""

import pytest

from lowbit.report import result_json

from .helpers import BENCH, COMPARE, OUTLIERS, PLAN, errors_report


@pytest.mark.parametrize("data, kind", [(COMPARE, "compare"), (BENCH, "bench"), (errors_report(), "errors"),
                                        (OUTLIERS, "outliers"), (PLAN, "plan"), (COMPARE["results"][2], "row"),
                                        ({"candidates": [], "anchor": "nf4", "layers": []}, "sensitivity"),
                                        ({"lowbit_layout": 1}, "saved"), ({"x": 1}, None), ([1], None)])
def test_json_kind(data, kind):
    assert result_json.json_kind(data) == kind
    assert result_json.describe(data)
