"""VQ results on a reference model: 1, 2 and 3 bits per weight x {k-means, ViM-VQ}, and 2-bit + A8.

Runs ``vmq vq --json`` for each cell (one at a time), keeps each run's JSON in --work (a rerun
skips finished cells), and writes a markdown table between the model's VQ_TABLE markers of the README.
Every cell's floating-point top-1 is measured in the same run as its vector-quantized top-1.

    python benchmarks/vq_table.py [--model vmamba_ref_cifar10] [--work runs/vq_table] [--cells vq-2bit,...]

``--checkpoint`` and ``--calibration-data`` as in ptq_table.py, for a model without shipped weights.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _readme import markers, model_sets, write_between  # noqa: E402
from vmq.models import REFERENCE_MODEL  # noqa: E402
from vmq.models.registry import shipped_weights  # noqa: E402
CELLS = {  # recipe stem: (bits, method label)
    "vq-1bit-kmeans": ("1", "k-means"),
    "vq-1bit": ("1", "ViM-VQ"),
    "vq-2bit-kmeans": ("2", "k-means"),
    "vq-2bit": ("2", "ViM-VQ"),
    "vq-3bit-kmeans": ("3", "k-means"),
    "vq-3bit": ("3", "ViM-VQ"),
    "vq-2bit-a8": ("2 + A8", "ViM-VQ"),
}


def run_cell(stem: str, work: Path, overrides) -> dict:
    out_json = work / f"{stem}.json"
    if out_json.is_file():
        return json.loads(out_json.read_text())
    cmd = [sys.executable, "-m", "vmq_cli.main", "vq", "--recipe", str(ROOT / "configs" / f"{stem}.yaml"),
           "--out", str(work / f"{stem}.safetensors"), "--json"] + [a for s in overrides for a in ("--set", s)]
    print(f"[vq_table] {stem} ...", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout)
    out_json.write_text(json.dumps(result, indent=2))
    return result


def table(model: str, results: dict, fp_bytes: int) -> str:
    first = next(iter(results.values()))
    lines = [
        f"Model `{model}`, {first['eval_images']} shipped CIFAR-10 test images, "
        f"{first['calibration_images']} calibration images. Floating point: **{first['fp_top1']:.2f} %** top-1 "
        f"(fp32 checkpoint {fp_bytes:,} bytes). Bits per weight over the vector-quantized layers: codes alone, "
        "then with the fp16 codebooks and row scales.",
        "",
        "| bits | method | codebook | top-1 % | vs FP | agreement % | logit SNR dB | bits/w codes | bits/w all "
        "| vq s | command s | packed bytes | vs fp32 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for stem, (bits, label) in CELLS.items():
        r = results.get(stem)
        if r is None:
            continue
        lines.append(f"| {bits} | {label} | {r['scheme'].split('-', 1)[1]} | {r['quant_top1']:.2f} "
                     f"| {r['quant_top1'] - r['fp_top1']:+.2f} | {r['top1_agreement']:.2f} | {r['logit_snr_db']:.2f} "
                     f"| {r['code_bits_per_weight']:.2f} | {r['bits_per_weight']:.2f} | {r['vq_seconds']:.0f} "
                     f"| {r['total_seconds']:.0f} | {r['file_bytes']:,} | {r['file_bytes'] / fp_bytes:.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=REFERENCE_MODEL)
    ap.add_argument("--checkpoint", type=Path, default=None, help="weights of a model that ships none")
    ap.add_argument("--calibration-data", type=Path, default=None, help="image folder (models without shipped data)")
    ap.add_argument("--work", type=Path, default=None, help="default: runs/vq_table/MODEL")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args()
    work = args.work or ROOT / "runs" / "vq_table" / args.model
    work.mkdir(parents=True, exist_ok=True)
    results = {stem: run_cell(stem, work, model_sets(args) + args.overrides) for stem in args.cells.split(",")}
    fp_bytes = (args.checkpoint or shipped_weights(args.model)).stat().st_size
    md = table(args.model, results, fp_bytes)
    print(md)
    write_between(args.readme, *markers("VQ_TABLE", args.model), md, "vq_table")


if __name__ == "__main__":
    main()
