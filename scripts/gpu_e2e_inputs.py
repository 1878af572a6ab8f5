"""Inputs of the GPU check's end-to-end steps: random-weight checkpoints and random images.

    python3 scripts/gpu_e2e_inputs.py WORK [--images 256] [--models vim_small vim_base]

Writes WORK/<model>_random.pth (the registered architecture with its initial random weights, a
plain state dict) for each model, and WORK/images/random/NNNN.png: random 224 x 224 RGB images
in ImageNet layout, for ``calibration.data``. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

from vmq.models import create_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("work", type=Path)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--models", nargs="+", default=["vim_small", "vim_base"])
    args = ap.parse_args()
    folder = args.work / "images" / "random"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.images):
        pixels = rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"{i:04d}.png", compress_level=1)
    for name in args.models:
        torch.manual_seed(0)
        model = create_model(name, None, pretrained=False)
        out = args.work / f"{name}_random.pth"
        torch.save({k: v.contiguous() for k, v in model.state_dict().items()}, out)
        params = sum(p.numel() for p in model.parameters())
        print(f"{out}: {name}, {params / 1e6:.1f} M parameters, random weights")
    print(f"{folder}: {args.images} random {args.size}x{args.size} images")


if __name__ == "__main__":
    main()
