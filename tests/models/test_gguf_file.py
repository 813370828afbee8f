"""A .gguf file cut short is refused in one line naming it, wherever the cut falls."""

from __future__ import annotations

from pathlib import Path

import pytest

from lowbit import load_model
from lowbit.errors import ModelLoadError
from lowbit.models import resolve
from lowbit.models.gguf_file import check_complete

EMBEDDED = Path(resolve(None)[1])


def _cut_points() -> dict[str, int]:
    data = EMBEDDED.read_bytes()
    table = data.find(b"blk.0.attn_q.weight")  # a tensor name: only the tensor table holds one
    assert table > 0
    return {"magic": 2, "header": 24, "metadata": 4096, "tensor table": table + 5, "data": len(data) // 2,
            "last byte": len(data) - 1}


CUTS = _cut_points()
SECTION = {"magic": "header", "header": "metadata", "metadata": "metadata", "tensor table": "tensor table"}


@pytest.mark.parametrize("where", list(CUTS))
def test_truncated_gguf_is_one_line_error(tmp_path, where):
    cut = tmp_path / "cut.gguf"
    with open(EMBEDDED, "rb") as f:
        cut.write_bytes(f.read(CUTS[where]))
    with pytest.raises(ModelLoadError, match=rf"^not a complete GGUF file: .*cut\.gguf \({CUTS[where]} bytes; ") as err:
        load_model(cut)
    message = str(err.value)
    assert "\n" not in message and "unpack_from" not in message
    if where in SECTION:
        assert f"it ends inside the {SECTION[where]}" in message and message.endswith(")")
    else:  # the tensor table is whole, the data is not: say how many bytes it needs
        assert message.endswith(f"its tensor table needs {EMBEDDED.stat().st_size})")


def test_complete_file_passes_and_non_gguf_is_left_to_the_loader(tmp_path):
    check_complete(EMBEDDED)
    other = tmp_path / "x.gguf"
    other.write_bytes(b"not a gguf file" * 100)
    check_complete(other)  # not GGUF at all: the loader's own error names it
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    with pytest.raises(ModelLoadError, match="it is empty"):
        check_complete(empty)
