"""Write a generated markdown block into the README between two marker comments; what the table scripts share."""

from __future__ import annotations

import json
import subprocess
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


def quantize_cell(recipe: Path, bits: tuple, out: Path, sets: list, out_json: Path, label: str) -> dict:
    """One ``vmq quantize --json`` at ``bits`` = (weights, activations) with ``--set`` overrides, its
    JSON kept in ``out_json`` (a rerun returns the kept one)."""
    if out_json.is_file():
        return json.loads(out_json.read_text())
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "vmq_cli.main", "quantize", "--recipe", str(recipe),
           "--set", f"quantization.scheme.weights.num_bits={bits[0]}",
           "--set", f"quantization.scheme.input_activations.num_bits={bits[1]}", "--out", str(out), "--json"]
    cmd += [x for s in sets for x in ("--set", s)]
    print(f"{label} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    result = json.loads(proc.stdout)
    out_json.write_text(json.dumps(result, indent=2))
    return result
