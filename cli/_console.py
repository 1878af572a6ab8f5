"""Output helpers: results on stdout (a rich table or JSON), progress and logs on stderr."""

from __future__ import annotations

import json
import sys
from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

from rich.console import Console
from rich.table import Table

out = Console(file=sys.stdout, soft_wrap=True)
err = Console(file=sys.stderr, soft_wrap=True)


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def emit_table(title: str, rows: Sequence[Sequence[str]], headers: Sequence[str] = ("", "")) -> None:
    table = Table(title=title, show_header=any(headers), title_justify="left")
    for h in headers:
        table.add_column(h)
    for row in rows:
        table.add_row(*[str(c) for c in row])
    out.print(table)


@contextmanager
def progress(description: str, total: Optional[int]) -> Iterator:
    """A transient rich progress bar on stderr; yields ``update(done, total)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    enabled = err.is_terminal
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=err, transient=True, disable=not enabled) as bar:
        task = bar.add_task(description, total=total)

        def update(done: int, total_: Optional[int] = None) -> None:
            bar.update(task, completed=done, total=total_ or total)

        yield update


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {msg}", highlight=False)


def info(msg: str) -> None:
    err.print(msg, highlight=False)
