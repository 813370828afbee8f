"""What every lowbit figure shares: a matplotlib Figure on its own Agg canvas (never pyplot, so nothing
global holds it), the legend note, the per-layer x axis, and writing one as PNG bytes or a file."""

from __future__ import annotations

import io
import os
from pathlib import Path

from ..errors import InputError
from . import plot_data as pd

SUFFIXES = (".png", ".svg", ".pdf")
DPI = 110


def check_suffix(path: str | os.PathLike) -> str:
    """The output format of ``path`` (png, svg or pdf, from its suffix), or a ValueError."""
    suffix = Path(path).suffix.lower()
    if suffix not in SUFFIXES:
        raise InputError(f"{path}: a figure is written as {', '.join(SUFFIXES)} (from the file name's suffix)")
    return suffix[1:]


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def save_figure(fig, path: str | os.PathLike) -> Path:
    """``fig`` written to ``path`` atomically, in the format its suffix names; the figure is cleared after."""
    from ..files.atomic import atomic_file

    kind = check_suffix(path)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format=kind, dpi=DPI)
    fig.clear()
    return Path(path)


def new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def legend_note(text: str):
    """An invisible legend handle: a line of explanation in the legend."""
    from matplotlib.patches import Patch

    return Patch(fill=False, edgecolor="none", label=text)


def layer_axis(ax, names: list[str], label: str) -> None:
    """An x axis of one bar per layer: each name when they fit, else a tick per transformer block."""
    if len(names) <= 40:
        ax.set_xticks(range(len(names)), [name.removeprefix("model.") for name in names], rotation=90, fontsize=7)
    else:
        ax.set_xticks(*pd.block_ticks(names), fontsize=7)
        label += " (ticks: transformer block number)"
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_xlabel(label)


def model_name(report) -> str:
    model = report.get("model") if isinstance(report, dict) else None
    return (model or {}).get("name") or (model or {}).get("source") or "model"
