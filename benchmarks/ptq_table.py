"""PTQ results on a reference model: W8A8, W6A6, W4A8, W4A4 x {RTN, SmoothQuant, PTS, PTQ4VM}.

Runs ``vmq quantize --json`` for each cell (one at a time), keeps each run's JSON in --work (a
rerun skips finished cells), and writes a markdown table between the model's PTQ_TABLE markers
of the README. Every cell's floating-point top-1 is measured in the same run as its quantized top-1.

    python benchmarks/ptq_table.py [--model vmamba_ref_cifar10] [--work runs/ptq_table] [--readme README.md]

Another model (``--model`` with ``--checkpoint`` and ``--calibration-data``, e.g. a tiny variant
with fixture weights) gets the same table; its top-1 means little then, agreement and SNR do.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _readme import markers, model_sets, quantize_cell, write_between  # noqa: E402
from vmq.models import REFERENCE_MODEL  # noqa: E402
from vmq.models.registry import shipped_weights  # noqa: E402
SCHEMES = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}
METHODS = {  # recipe file, shown name
    "rtn": ("configs/w4a8-rtn.yaml", "RTN"),
    "smoothquant": ("configs/w4a8-smoothquant.yaml", "SmoothQuant"),
    "pts": ("configs/w4a8-pts.yaml", "PTS"),
    "ptq4vm": ("configs/w4a8.yaml", "PTQ4VM"),
}


def run_cell(scheme: str, method: str, work: Path, sets: list) -> dict:
    stem = f"{scheme.lower()}-{method}"
    return quantize_cell(ROOT / METHODS[method][0], SCHEMES[scheme], work / f"{stem}.safetensors", sets,
                         work / f"{stem}.json", f"[ptq_table] {scheme} {method}")


def table(model: str, results: dict, fp_bytes: int) -> str:
    fp_top1 = {r["fp_top1"] for r in results.values()}
    first = next(iter(results.values()))
    lines = [
        f"Model `{model}`, {first['eval_images']} shipped CIFAR-10 test "
        f"images, {first['calibration_images']} calibration images. Floating point: **{min(fp_top1):.2f} %** top-1 "
        f"(fp32 checkpoint {fp_bytes:,} bytes).",
        "Agreement: share of images whose top-1 class matches the floating-point model's; logit SNR: "
        "10 log10(|z_fp|^2 / |z_fp - z_q|^2) over all logits. Both measure the quantization error "
        "directly and vary far less than a difference of two top-1 figures on 1017 images "
        "(one image is 0.1 point).",
        "",
        "| scheme | method | top-1 % | vs FP | agreement % | logit SNR dB | quantize s | command s | packed bytes | vs fp32 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for scheme in SCHEMES:
        for method, (_, label) in METHODS.items():
            r = results.get((scheme, method))
            if r is None:
                continue
            delta = r["quant_top1"] - r["fp_top1"]
            lines.append(f"| {scheme} | {label} | {r['quant_top1']:.2f} | {delta:+.2f} | {r['top1_agreement']:.2f} "
                         f"| {r['logit_snr_db']:.2f} | {r['quantize_seconds']:.0f} "
                         f"| {r['total_seconds']:.0f} | {r['file_bytes']:,} | {r['file_bytes'] / fp_bytes:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=REFERENCE_MODEL)
    ap.add_argument("--checkpoint", type=Path, default=None, help="weights of a model that ships none")
    ap.add_argument("--calibration-data", type=Path, default=None, help="image folder (models without shipped data)")
    ap.add_argument("--work", type=Path, default=None, help="default: runs/ptq_table/MODEL")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="recipe overrides for every cell")
    args = ap.parse_args()
    work = args.work or ROOT / "runs" / "ptq_table" / args.model
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            results[(scheme, method)] = run_cell(scheme, method, work, model_sets(args) + args.overrides)
    fp_bytes = (args.checkpoint or shipped_weights(args.model)).stat().st_size
    md = table(args.model, results, fp_bytes)
    print(md)
    write_between(args.readme, *markers("PTQ_TABLE", args.model), md, "ptq_table")


if __name__ == "__main__":
    main()
