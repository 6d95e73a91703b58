"""A rich progress bar over finished requests (quiet when stderr is not a terminal)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


@contextlib.contextmanager
def request_progress(total: int, label: str) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(num_finished)``; the bar redraws at most ~10 times a second."""
    console = Console(stderr=True)
    progress = Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=True,
                        disable=not console.is_terminal)
    task = progress.add_task(label, total=total)
    done = 0

    def advance(num_finished: int) -> None:
        nonlocal done
        if num_finished:
            done += num_finished
            progress.update(task, completed=done)

    with progress:
        yield advance
