"""Progress bars on stderr (rich), shown only on a terminal: in logs a transient bar leaves stray lines."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def progress_bar(total: int, label: str, *, enabled: bool = True) -> Iterator:
    """Yields ``advance()``; a transient bar with count and elapsed time while the block runs."""
    from rich.console import Console

    console = Console(stderr=True) if enabled else None
    if console is None or not console.is_terminal:
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)
