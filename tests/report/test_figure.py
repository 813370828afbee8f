"""Saving a figure: the format its suffix names, written atomically; an unknown suffix refused."""

import pytest

from lowbit.formats import get_format
from lowbit.report import plots
from lowbit.report.figure import save_figure

matplotlib_image = pytest.importorskip("matplotlib.image")


@pytest.mark.parametrize("suffix, magic", [(".png", b"\x89PNG"), (".svg", b"<?xml"), (".pdf", b"%PDF")])
def test_save_figure_writes_the_suffix_format_atomically(tmp_path, suffix, magic):
    path = save_figure(plots.format_levels({"int4": get_format("int4").values}), tmp_path / f"f{suffix}")
    assert path.read_bytes().startswith(magic)
    assert [p.name for p in tmp_path.iterdir()] == [f"f{suffix}"]  # no temp file left


def test_save_figure_refuses_an_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.png, \.svg, \.pdf"):
        save_figure(plots.format_levels({"int4": [0.0, 1.0]}), tmp_path / "f.jpg")
    assert not list(tmp_path.iterdir())
