"""How much of a quantized reference model's accuracy is fitted to its calibration images.

For each packed file of a reference model, the logit SNR against the floating-point model
(10 log10 |z_fp|^2 / |z_fp - z_q|^2, over all logits) on four sets of images: the shipped
evaluation images; the calibration images JLSS learns from; the held-out ones (the last
``--holdout`` share of the calibration images, in their calibration order); and the shipped
calibration-set images the run did not use (training images no step of the run saw). A start
(PTS) that is much better on its own calibration images than on the others has fitted its
ranges to them, and a held-out check on those images is then optimistic.

    python benchmarks/calibration_fit.py RUN.safetensors... [--num-images 256] [--holdout 0.25]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmq.data import (_evenly_spaced, calibration_images, eval_transform, shipped_calibration_set,  # noqa: E402
                      shipped_eval_set)
from vmq.metrics import snr_db  # noqa: E402
from vmq.models import create_model  # noqa: E402
from vmq.optimise import holdout_split  # noqa: E402
from vmq.pack.format import load_packed  # noqa: E402


def logits(model, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    return torch.cat([model(images[i:i + batch]) for i in range(0, len(images), batch)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", nargs="+", type=Path)
    ap.add_argument("--num-images", type=int, default=256, help="the runs' calibration.num_images")
    ap.add_argument("--batch-size", type=int, default=32, help="the runs' calibration.batch_size")
    ap.add_argument("--holdout", type=float, default=0.25, help="the runs' jlss.holdout")
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    fp = create_model().eval()
    transform, _ = eval_transform(fp)
    ev = shipped_eval_set(transform)
    cal, _ = calibration_images(fp, None, args.num_images)
    everything = shipped_calibration_set(transform)
    used = set(_evenly_spaced(len(everything), args.num_images))
    learn = holdout_split(args.num_images, args.batch_size, args.holdout)
    sets = {
        "evaluation": torch.stack([ev[i][0] for i in range(len(ev))]),
        "calibration, learning": cal[:learn],
        "calibration, held out": cal[learn:],
        "training, unused": torch.stack([everything[i][0] for i in range(len(everything)) if i not in used]),
    }
    sets = {k: v for k, v in sets.items() if len(v)}
    ref = {k: logits(fp, v) for k, v in sets.items()}
    print("| run | " + " | ".join(f"{k} ({len(v)})" for k, v in sets.items()) + " |")
    print("|---|" + "---:|" * len(sets))
    for path in args.packed:
        model, _ = load_packed(path)
        model.eval()
        cells = [f"{snr_db(ref[k], logits(model, v)):.2f}" for k, v in sets.items()]
        print(f"| {path.name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
