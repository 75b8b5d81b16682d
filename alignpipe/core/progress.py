"""A rich progress bar on stderr with rows/s and, when the rows carry token counts, tokens/s."""
from __future__ import annotations

import contextlib
import sys
import time


class _Bar:
    def __init__(self, progress, task, start):
        self.progress, self.task, self.start, self.tokens, self.rows = progress, task, start, 0, 0

    def advance(self, rows: int, result=None) -> None:
        if result is not None and "num_tokens" in getattr(result, "column_names", []):
            self.tokens += int(sum(result["num_tokens"]))
        self.rows += rows
        elapsed = max(time.time() - self.start, 1e-9)
        rate = f"{self.rows / elapsed:,.1f} rows/s" + (f", {self.tokens / elapsed:,.0f} tok/s" if self.tokens else "")
        self.progress.update(self.task, advance=rows, rate=rate)


@contextlib.contextmanager
def progress_bar(desc: str, total: int, done: int = 0):
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    columns = [TextColumn(desc), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TimeRemainingColumn()]
    with Progress(*columns, console=console, disable=not console.is_terminal, transient=False) as p:
        task = p.add_task(desc, total=total, completed=done, rate="")
        yield _Bar(p, task, time.time())
