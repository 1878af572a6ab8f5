"""``vmq inspect``: what a packed file holds, from its header and metadata (no model is built)."""

from __future__ import annotations

import click


@click.command("inspect")
@click.argument("path", type=click.Path(dir_okay=False))
@click.option("--no-verify", is_flag=True, help="Do not check the payload against its recorded SHA-256.")
@click.option("--json", "as_json", is_flag=True, help="Print as JSON (stdout holds the JSON only).")
def command(path, no_verify, as_json):
    """Show a packed file: model, method, recipe, each layer's scheme and bits per weight, its size
    against the fp32 checkpoint, the accuracy recorded at compression and the checksum status.

    The exit status is 1 when the payload does not match its checksum (after printing the report).
    """
    from vmq.errors import VmqError
    from vmq.pack.inspect import inspect_packed
    from vmq_cli import _console as console

    info = inspect_packed(path, verify=not no_verify)
    if as_json:
        console.emit_json(info)
    else:
        _print(console, info)
    if info["checksum"] == "mismatch":
        raise VmqError(f"{path}: payload checksum mismatch: the file is corrupt")


def _print(console, info: dict) -> None:
    size, results = info["size"], info["results"]
    model = info["model"]
    rows = [["model", f"{model['name']} ({model['family']})"],
            ["method", f"{info['method']} {info['scheme'] or ''}".strip()],
            ["format", f"{info['format_version']} (vmq {info['vmq_version']}; "
                       f"this vmq writes {info['reader_format_version']})"],
            ["file", f"{size['file_bytes']:,} bytes"],
            ["fp32 checkpoint", f"{size['fp32_bytes']:,} bytes ({size['ratio']}x the file)"],
            ["compressed weights", f"{size['compressed_weights']:,} in {len(info['layers'])} layers, "
                                   f"{size['bits_per_weight']} bits per weight"],
            ["checksum", info["checksum"]]]
    if info["payload_sha256"]:
        rows.append(["payload sha256", f"{str(info['payload_sha256'])[:16]}..."])
    for key in ("fp_top1", "quant_top1", "fp_top5", "quant_top5", "top1_agreement", "logit_snr_db", "eval_images",
                "calibration_images", "code_bits_per_weight", "bits_per_weight"):
        if results.get(key) is not None:
            rows.append([f"recorded {key}", str(results[key])])
    console.emit_table(f"vmq inspect: {info['file']}", rows)
    layer_rows = []
    for name, layer in info["layers"].items():
        bits = layer["bits_per_weight"]
        split = " + ".join(f"{k} {v:.3g}" for k, v in bits.items() if k != "total" and v)
        layer_rows.append([name, layer["scheme"], f"{layer['shape'][0]}x{layer['shape'][1]}",
                           f"{bits['total']:.3g}" if bits else "-", split or "-"])
    console.emit_table("layers", layer_rows, headers=("layer", "scheme", "out x in", "bits/w", "of which"),
                       no_wrap=(0, 1, 3))
    recipe = info["recipe"]
    if recipe:
        import json

        console.emit_table("recipe", [[k, json.dumps(v, sort_keys=True)] for k, v in recipe.items()])
