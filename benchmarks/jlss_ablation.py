"""JLSS ablation on a reference model: which settings make PTQ4VM improve on its own start (PTS).

Runs one ``vmq quantize --json`` per (scheme, variant) cell, one at a time, keeping each run's
JSON in --work (a rerun skips finished cells), and prints a markdown table, which it also writes
between the model's JLSS_ABLATION markers of the README. Every variant starts from the same
initialisation (PTS: smoothing, per-token static ranges, truncation search); the ``pts`` row is
that start without learning. Per row: top-1 on the shipped evaluation images, top-1 agreement
and logit SNR against the floating-point model, and the block loss on the held-out calibration
images (the last quarter, never learned from) at the start and for the parameters each block
kept, summed over the blocks (what the check measures: the logits' relative squared error, or
the block loss for ``block``), with the steps kept per block.

    python benchmarks/jlss_ablation.py [--schemes W8A8,W6A6,W4A8,W4A4] [--variants default,last,...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _readme import markers, model_sets, quantize_cell, write_between  # noqa: E402
from vmq.models import REFERENCE_MODEL  # noqa: E402

SCHEMES = {"W8A8": (8, 8), "W6A6": (6, 6), "W4A8": (4, 8), "W4A4": (4, 4)}
#: name: (what it is, --set overrides on top of configs/w4a8.yaml with the scheme's bits)
VARIANTS = {
    "pts": ("the start: PTS, no learning", ["quantization.method=pts"]),
    "default": ("vmq's defaults: logit-weighted loss, FP target; the step kept is the one whose logits follow FP "
                "best on the held-out images", []),
    "block": ("the step kept is the one with the lowest block loss on the held-out images",
              ["quantization.jlss.select=block"]),
    "mse": ("loss: relative MSE per token (the default before the logit-weighted loss)",
            ["quantization.jlss.loss=mse"]),
    "last": ("no held-out images: the last step unless worse than the start on the learning images",
             ["quantization.jlss.holdout=0"]),
    "cosine": ("PTQ4VM's loss (1 - cosine)", ["quantization.jlss.loss=cosine"]),
    "quant-target": ("target: the FP block on the quantized inputs", ["quantization.jlss.target=quant_input"]),
    "lr/5": ("learning rates / 5", ["quantization.jlss.lr_scale=2e-4", "quantization.jlss.lr_smooth=2e-3"]),
    "official-lr": ("PTQ4VM's learning rates (5e-4 steps, 1e-2 smoothing) and 1 - cosine",
                    ["quantization.jlss.lr_scale=5e-4", "quantization.jlss.loss=cosine"]),
    "steps300": ("300 steps", ["quantization.jlss.iterations=300"]),
}


def run_cell(scheme: str, variant: str, work: Path, sets: list) -> dict:
    return quantize_cell(ROOT / "configs" / "w4a8.yaml", SCHEMES[scheme], work / "model.safetensors",
                         sets + VARIANTS[variant][1], work / f"{scheme.lower()}-{variant.replace('/', '_')}.json",
                         f"[jlss_ablation] {scheme} {variant}")


def blocks(result: dict) -> list:
    """One report per block (the JLSS figures are repeated on each of a block's layers)."""
    seen = {}
    for layer in result["layers"]:
        seen.setdefault(layer["name"].split(".mixer.")[0], layer)
    return list(seen.values())


def held_out(result: dict) -> tuple:
    """Summed held-out block loss at the start and for the kept parameters; steps kept per block."""
    bl = blocks(result)
    if bl[0].get("jlss_holdout_before") is not None:
        return (sum(b["jlss_holdout_before"] for b in bl), sum(b["jlss_holdout_after"] for b in bl),
                "/".join(str(b["jlss_steps_kept"]) for b in bl))
    return None, None, "/".join(str(b.get("jlss_steps_kept")) for b in bl if b.get("jlss_steps_kept") is not None)


def table(results: dict) -> str:
    first = next(iter(results.values()))
    lines = [
        f"Model `{first['model']}`, {first['calibration_images']} calibration images (the last quarter held out "
        f"from learning), {first['eval_images']} evaluation images. Held-out: what the held-out check measures "
        "on the held-out calibration images (the logits' relative squared error; the block loss for `block`), "
        "summed over the blocks, at each block's start and for the parameters it kept.",
        "",
        "| scheme | variant | top-1 % | agreement % | logit SNR dB | held-out start | held-out kept "
        "| steps kept per block | quantize s |",
        "|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for (scheme, variant), r in results.items():
        start, kept, steps = held_out(r)
        f = (lambda v: "" if v is None else f"{v:.4f}")
        lines.append(f"| {scheme} | {variant} | {r['quant_top1']:.2f} | {r['top1_agreement']:.2f} "
                     f"| {r['logit_snr_db']:.2f} | {f(start)} | {f(kept)} | {steps} | {r['quantize_seconds']:.0f} |")
    lines += ["", "Variants: " + "; ".join(f"`{k}`: {VARIANTS[k][0]}" for k in dict.fromkeys(v for _, v in results))
              + "."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=REFERENCE_MODEL)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--calibration-data", type=Path, default=None)
    ap.add_argument("--schemes", default="W8A8,W6A6,W4A8,W4A4")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names: " + ", ".join(VARIANTS))
    ap.add_argument("--work", type=Path, default=None, help="default: runs/jlss_ablation/MODEL")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md")
    ap.add_argument("--cached", action="store_true", help="table the cells already in --work; run nothing")
    args = ap.parse_args()
    for v in args.variants.split(","):
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r}; variants: {', '.join(VARIANTS)}")
    work = args.work or ROOT / "runs" / "jlss_ablation" / args.model
    work.mkdir(parents=True, exist_ok=True)
    results = {}
    for scheme in args.schemes.split(","):
        for variant in args.variants.split(","):
            done = (work / f"{scheme.lower()}-{variant.replace('/', '_')}.json").is_file()
            if done or not args.cached:
                results[(scheme, variant)] = run_cell(scheme, variant, work, model_sets(args))
    md = table(results)
    print(md)
    write_between(args.readme, *markers("JLSS_ABLATION", args.model), md, "jlss_ablation")


if __name__ == "__main__":
    main()
