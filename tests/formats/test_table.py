"""The one table of format facts: every registered format comes from it, and nothing else writes an id."""

from pathlib import Path

import lowbit
from lowbit.formats.table import FACTS

SRC = Path(lowbit.__file__).parent


def test_format_ids_are_written_once():
    """Every registered format comes from the facts table, and no codec module writes an id."""
    assert {f.name for f in FACTS} == set(lowbit.formats())
    for f in FACTS:
        spec = lowbit.get_format(f.name)
        assert (spec.id, spec.bits, spec.default_block_size, spec.family) == (f.id, f.bits, f.block, f.family)
    for path in [*(SRC / "formats").glob("*.py"), *(SRC / "gguf").glob("*.py")]:
        if path.name not in ("table.py", "catalog.py"):  # the table, and define() that reads it
            assert "id=" not in path.read_text().replace("_id=", ""), path
    assert lowbit.get_format("q4_0").gguf_type == "Q4_0" and lowbit.get_format("nf4").bnb_quant_type == "nf4"
