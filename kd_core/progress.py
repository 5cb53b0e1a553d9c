"""Console progress bars and messages shared by every stage (rich, on stderr). A message never
shows the credentials of a URL it names."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from kd_core.redaction import redact

console = Console(stderr=True, highlight=False, width=None if sys.stderr.isatty() else 120)
_QUIET = os.environ.get("KDFLOW_QUIET") == "1"
_SILENCED: ContextVar[bool] = ContextVar("kdflow_silenced", default=False)


@contextmanager
def silenced() -> Iterator[None]:
    """No `say` messages in this block: e.g. while collecting the manifests of steps that ran
    elsewhere, whose "reused" lines would only mislead."""
    token = _SILENCED.set(True)
    try:
        yield
    finally:
        _SILENCED.reset(token)


def say(message: str) -> None:
    """Print a message, with credentials written into URLs masked (`kd_core.redaction`)."""
    if not _QUIET and not _SILENCED.get():
        console.print(redact(message))


class Bar:
    """A handle on one progress bar: `advance(n)` and a free-text status on its right."""

    def __init__(self, progress: Progress | None, task_id: int | None):
        self._progress, self._task = progress, task_id

    def advance(self, amount: float = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, amount)

    def update(self, completed: float | None = None, status: str | None = None) -> None:
        if self._progress is None:
            return
        fields = {"status": status} if status is not None else {}
        self._progress.update(self._task, completed=completed, **fields)


@contextmanager
def progress_bar(description: str, total: float | None) -> Iterator[Bar]:
    """A bar for one long step; silent when KDFLOW_QUIET=1."""
    if _QUIET:
        yield Bar(None, None)
        return
    columns = [
        TextColumn("[bold]{task.description}"),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    ]
    with Progress(*columns, console=console, transient=False, disable=not sys.stderr) as progress:
        task_id = progress.add_task(description, total=total, status="")
        yield Bar(progress, task_id)
