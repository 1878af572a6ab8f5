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


def emit_table(title: str, rows: Sequence[Sequence[str]], headers: Sequence[str] = ("", ""),
               no_wrap: Sequence[int] = ()) -> None:
    """A table on stdout; the columns ``no_wrap`` are never wrapped or cut (names that must stay whole)."""
    table = Table(title=title, show_header=any(headers), title_justify="left")
    for i, h in enumerate(headers):
        table.add_column(h, no_wrap=i in no_wrap, overflow="fold")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    out.print(table)


@contextmanager
def progress(description: str, total: Optional[int], every_s: float = 10.0, unit: Optional[str] = None) -> Iterator:
    """Progress on stderr; yields ``update(done, total)``.

    On a terminal: a transient rich progress bar (with ``unit``: the rate in ``unit``/s and the
    time left). Otherwise (logs, CI, pipes): a plain line ``description: done/total (elapsed s)``
    (with ``unit``: ``..., rate unit/s, about N s left``) at most every ``every_s`` seconds, so short
    runs print nothing and long ones show that they advance.
    """
    import time

    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    if not err.is_terminal:
        start = last = time.monotonic()

        def log(done: int, total_: Optional[int] = None) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last >= every_s:
                last = now
                of = total_ or total
                line = f"{description}: {done}{f'/{of}' if of else ''}"
                if unit:
                    rate = done / max(now - start, 1e-9)
                    line += f" {unit} ({now - start:.0f} s, {rate:.1f} {unit}/s"
                    line += f", about {(of - done) / rate:.0f} s left)" if of and rate > 0 else ")"
                else:
                    line += f" ({now - start:.0f} s)"
                sys.stderr.write(line + "\n")
                sys.stderr.flush()

        yield log
        return
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn()]
    if unit:
        columns += [TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn()]
    else:
        columns.append(TimeElapsedColumn())
    with Progress(*columns, console=err, transient=True) as bar:
        task = bar.add_task(description, total=total, rate="")
        start = time.monotonic()

        def update(done: int, total_: Optional[int] = None) -> None:
            rate = done / max(time.monotonic() - start, 1e-9)
            bar.update(task, completed=done, total=total_ or total, rate=f"{rate:.1f} {unit}/s" if unit else "")

        yield update


def warn(msg: str) -> None:
    err.print(f"[yellow]warning:[/] {msg}", highlight=False)


def info(msg: str) -> None:
    err.print(msg, highlight=False)
