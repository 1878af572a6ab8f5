"""Print (or write into the README) the table of registered models: family, alias, name, parameters.

    python scripts/model_table.py            # print the markdown table
    python scripts/model_table.py --write    # replace the README's block between the MODEL_TABLE markers

Parameters are counted on a model built on the meta device (no memory, no weights).
``tests/test_configs.py`` checks that the README holds what this prints.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._readme import write_between  # noqa: E402
from vmq.models import FAMILIES, reference_models  # noqa: E402
from vmq.models.registry import ALIASES, MODELS  # noqa: E402

BEGIN, END = "<!-- MODEL_TABLE:BEGIN -->", "<!-- MODEL_TABLE:END -->"
FAMILY_TITLES = {"vim": "Vim", "vmamba": "VMamba", "local_vim": "LocalVim", "local_vmamba": "LocalVMamba"}


def parameters(name: str) -> int:
    entry = MODELS[name]
    with torch.device("meta"):
        model = entry.family.build(entry.config)
    return sum(p.numel() for p in model.parameters())


def table() -> str:
    aliases = {}
    for alias, name in ALIASES.items():
        aliases.setdefault(name, []).append(alias)
    refs = set(reference_models())
    rows = ["| family | alias | registered name | params |", "|---|---|---|---|"]
    for fam in FAMILIES:
        title = FAMILY_TITLES.get(fam, fam)
        names = [n for n, e in MODELS.items() if e.family.name == fam]
        tests = [n for n in names if n.startswith("test_")]
        for name in names:
            if name in tests:
                continue
            alias = ", ".join(f"`{a}`" for a in aliases.get(name, []))
            label = f"`{name}`" + (" (vmq's shipped reference model, see below)" if name in refs else "")
            rows.append(f"| {title} | {alias} | {label} | {parameters(name) / 1e6:.2f} M |")
        if tests:
            rows.append(f"| {title} | | {', '.join(f'`{n}`' for n in tests)} (tiny, for tests) | |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--write", action="store_true", help="write the table into README.md")
    args = ap.parse_args()
    md = table()
    if args.write:
        write_between(ROOT / "README.md", BEGIN, END, md, "models")
    else:
        print(md)


if __name__ == "__main__":
    main()
