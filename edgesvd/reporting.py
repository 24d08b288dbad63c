"""How long work reports progress: a Reporter is passed in; the default one says nothing."""

from __future__ import annotations

import time
from contextlib import contextmanager


class Bar:
    """A progress bar's handle: `advance()` one step, `describe()` the current state."""

    def advance(self, n: int = 1) -> None:
        pass

    def describe(self, text: str) -> None:
        pass


class Reporter:
    """Receives what long work has to say. This base class is silent (the library default);
    the CLI passes a ConsoleReporter."""

    def step(self, text: str) -> None:
        """A stage of a longer job starts ("compress", "export", …)."""

    def info(self, text: str) -> None:
        """A one-line note (rich markup allowed)."""

    @contextmanager
    def progress(self, description: str, total: int | None):
        """A context manager yielding a Bar for `total` steps."""
        yield Bar()


SILENT = Reporter()


class _RichBar(Bar):
    def __init__(self, progress, task) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1) -> None:
        self._progress.update(self._task, advance=n)

    def describe(self, text: str) -> None:
        self._progress.update(self._task, description=text)


class _LineBar(Bar):
    """Progress as plain lines, for a console that is not a terminal (a log file, CI): a line at most
    every `every` seconds and one when the work is done, so a long job shows it is alive."""

    def __init__(self, console, description: str, total: int | None, every: float = 20.0) -> None:
        self.console, self.description, self.total, self.every = console, description, total, every
        self.done = 0
        self.start = self.last = time.monotonic()

    def _line(self) -> None:
        of = f"/{self.total}" if self.total else ""
        self.console.print(f"{self.description}: {self.done}{of} ({time.monotonic() - self.start:.0f} s)",
                           highlight=False)
        self.last = time.monotonic()

    def advance(self, n: int = 1) -> None:
        self.done += n
        if time.monotonic() - self.last >= self.every or (self.total and self.done >= self.total):
            self._line()

    def describe(self, text: str) -> None:
        self.description = text


class ConsoleReporter(Reporter):
    """Progress bars and notes on a rich Console (the CLI's stderr)."""

    def __init__(self, console, prefix: str = "edgesvd", bars: bool = True) -> None:
        self.console, self.prefix, self.bars = console, prefix, bars

    def step(self, text: str) -> None:
        self.console.print(f"[bold]{self.prefix}[/bold] · {text}")

    def info(self, text: str) -> None:
        self.console.print(text)

    @contextmanager
    def progress(self, description: str, total: int | None):
        if not self.bars:
            yield Bar()
            return
        if not self.console.is_terminal:  # rich would draw the bar only once, at the end
            yield _LineBar(self.console, description, total)
            return
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TimeRemainingColumn()]
        with Progress(*columns, console=self.console, transient=False) as progress:
            yield _RichBar(progress, progress.add_task(description, total=total))
