"""Write a generated markdown block into the README between two marker comments; what the table scripts share."""

from __future__ import annotations

import sys
from pathlib import Path


def write_between(readme: Path, begin: str, end: str, md: str, tag: str) -> None:
    """Replace what stands between ``begin`` and ``end`` in ``readme`` by ``md`` (no-op without markers)."""
    text = readme.read_text()
    if begin not in text or end not in text:
        print(f"[{tag}] no {begin} ... {end} markers in {readme}; not written", file=sys.stderr)
        return
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{begin}\n{md}\n{end}{tail}")
    print(f"[{tag}] wrote the table into {readme}", file=sys.stderr)


def markers(table: str, model: str) -> tuple:
    """The README markers of ``model``'s ``table`` (``PTQ_TABLE``, ``VQ_TABLE``)."""
    return f"<!-- {table}:{model}:BEGIN -->", f"<!-- {table}:{model}:END -->"


def model_sets(args) -> list:
    """``--set`` overrides that select ``args.model`` (and its weights and calibration data when it
    is not a reference model)."""
    sets = [f"model.name={args.model}"]
    if args.checkpoint:
        sets.append(f"model.checkpoint={args.checkpoint}")
    if args.calibration_data:
        sets.append(f"calibration.data={args.calibration_data}")
    return sets
