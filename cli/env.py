"""``vmq env``: what this machine offers vmq."""

from __future__ import annotations

import click


@click.command("env")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def command(as_json):
    """Show versions, CPU features, CUDA and kernel availability."""
    from vmq.env import collect
    from vmq_cli import _console as console

    info = collect()
    if as_json:
        console.emit_json(info)
        return
    rows = []
    for section, values in info.items():
        if isinstance(values, dict):
            for k, v in values.items():
                rows.append([f"{section}.{k}", v if not isinstance(v, list) else ", ".join(map(str, v)) or "-"])
        else:
            rows.append([section, values])
    console.emit_table("vmq env", rows)
