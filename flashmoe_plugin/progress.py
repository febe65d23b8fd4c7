"""Progress of long work (bench, bench --kernels, synth, convert, profile, inspect --verify):
one rich bar on stderr with a count and an ETA, shown only when stderr is a terminal, so stdout
(and `--json`) stays exactly the result and logs stay free of control codes.

    with progress_bar("synth mixtral-8x7b q4", unit="bytes") as bar:
        synth(..., progress=bar)            # long functions call bar(done, total)
    with progress_bar("bench") as bar:
        bar.stage("disk bandwidth")         # a new step: its own description, count and ETA
        bar.stage("decode", total=32); bar.advance()
        bar.log("a line kept above the bar (on stderr, bar or not)")

Functions doing the work take an optional `progress` callable and never import rich.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager


class Bar:
    """A reporter for one bar; every method is a no-op cost when the bar is not shown."""

    def __init__(self, progress, task, unit: str):
        self._p, self._task, self.unit = progress, task, unit

    def __call__(self, done, total=None, what: str | None = None):
        """Absolute position: done of total (None: unknown)."""
        if self._p is not None:
            fields = {"description": what} if what else {}
            self._p.update(self._task, completed=done, total=total, **fields)

    def advance(self, n: int = 1):
        if self._p is not None:
            self._p.advance(self._task, n)

    def stage(self, what: str, total: int | None = None, unit: str | None = None):
        """Start the next step of the work: a fresh bar at 0 of `total` (None: a pulse, no ETA)."""
        if self._p is not None:
            self._p.remove_task(self._task)
            self._task = self._p.add_task(what, total=total, unit=unit or self.unit)

    def log(self, message: str):
        if self._p is not None:
            self._p.console.print(message, markup=False, highlight=False)
        else:
            print(message, file=sys.stderr, flush=True)


def shown() -> bool:
    return sys.stderr.isatty()


@contextmanager
def progress_bar(description: str, total: int | None = None, unit: str = "steps"):
    """A Bar on stderr for the duration of the block (nothing at all when stderr is no terminal);
    unit "bytes" shows sizes (binary units) instead of counts. The bar goes away at the end."""
    if not shown():
        yield Bar(None, None, unit)
        return
    from rich.console import Console
    from rich.progress import (BarColumn, Progress, ProgressColumn, SpinnerColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)
    from rich.text import Text

    from .sizes import format_size

    class Count(ProgressColumn):
        """done/total (sizes for unit "bytes"); nothing while the total is unknown."""
        def render(self, task):
            if task.total is None:
                return Text("")
            if task.fields.get("unit") == "bytes":
                return Text(f"{format_size(task.completed)} / {format_size(task.total)}")
            return Text(f"{task.completed:.0f}/{task.total:.0f}")

    class Eta(TimeRemainingColumn):
        def render(self, task):
            return Text("") if task.total is None else Text.assemble("ETA ", super().render(task))

    p = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), Count(), TimeElapsedColumn(),
                 Eta(), console=Console(stderr=True), transient=True)
    with p:
        yield Bar(p, p.add_task(description, total=total, unit=unit), unit)


NO_PROGRESS = Bar(None, None, "steps")  # what long functions use when the caller passes none
