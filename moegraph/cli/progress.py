"""Progress for the steps a person waits on: live on a terminal, plain lines when piped or logged.

Rich's live displays draw nothing until they stop when the output is not a terminal, so a piped
``moegraph bench`` looked hung for minutes. Here every waiting step prints a plain "label ..." line
(and its updates, and the time it took) when the console is not a terminal.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

__all__ = ["waiting", "counted"]


@contextmanager
def waiting(console: Console, label: str) -> Iterator[Callable[[str], None]]:
    """A step of unknown length; yields ``update(message)``. Prints the elapsed time at the end."""
    t0 = time.perf_counter()
    if console.is_terminal:
        with console.status(escape(label)) as status:
            yield lambda msg: status.update(escape(f"{label}: {msg}"))
    else:
        console.print(f"{label} ...", markup=False, highlight=False, soft_wrap=True)
        yield lambda msg: console.print(f"  {msg}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"{label}: {time.perf_counter() - t0:.1f}s", markup=False, highlight=False, style="dim", soft_wrap=True)


class _PlainProgress:
    """``counted``'s stand-in off a terminal: a line every two seconds or so, none for a quick step."""

    def __init__(self, console: Console, label: str, total: int):
        self.console, self.label, self.total = console, label, max(total, 1)
        self.t0 = self.last = time.perf_counter()

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        now = time.perf_counter()
        if now - self.last >= 2.0 or (done >= total and self.last > self.t0):
            self.last = now
            self.console.print(f"{self.label}: {done}/{total} ({now - self.t0:.1f}s)", markup=False,
                               highlight=False, soft_wrap=True)


@contextmanager
def counted(console: Console, label: str, total: int) -> Iterator[Callable[..., None]]:
    """A step of ``total`` units; yields ``advance_to(done, total=None)``.

    The bar is redrawn on each update, not by rich's refresh thread: the planner forks processes while it
    runs (``moegraph.planner.forked``), and a fork while another thread holds a lock (the terminal's, the
    stream's) can leave the child waiting on it forever."""
    if console.is_terminal:
        with Progress(TextColumn(escape(label)), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=console, transient=True, auto_refresh=False) as prog:
            task = prog.add_task(label, total=total)
            prog.refresh()
            yield lambda done, tot=None: prog.update(task, completed=done, total=tot or total, refresh=True)
    else:
        yield _PlainProgress(console, label, total)
