"""Progress on stderr: a transient rich bar on a terminal; in logs (no terminal), one plain
line as each phase starts, so a long run shows where it is without stray bar fragments."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


def _stderr_is_terminal() -> bool:
    from rich.console import Console

    return Console(stderr=True).is_terminal


def note(line: str, *, enabled: bool = True) -> None:
    """One plain progress line on stderr when it is not a terminal (a terminal gets bars instead)."""
    if enabled and not _stderr_is_terminal():
        sys.stderr.write(f"lowbit: {line}\n")
        sys.stderr.flush()


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool = True) -> Iterator:
    """Yields ``advance(status=None)``; a transient bar with count and elapsed time while the block runs,
    ``status`` (e.g. the loss so far) shown after the label."""
    if not enabled:
        yield lambda status=None: None
        return
    if not _stderr_is_terminal():
        note(f"{label} ({total} steps)")
        yield lambda status=None: None
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda status=None: bar.update(task, advance=1,
                                             description=label if status is None else f"{label}: {status}")
