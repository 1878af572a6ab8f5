"""Write vmq's shipped CIFAR-10 calibration images into an image folder (``OUT/train/<class>/*.png``).

The shipped calibration set is the reference models' default; a model without shipped weights
(e.g. a tiny test variant run with parity-fixture weights by ptq_table.py / vq_table.py) takes
calibration images from a folder, which this makes.

    python benchmarks/shipped_images.py runs/calibration_folder
"""

from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

from vmq.data import shipped_calibration_set


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__.strip())
    out = Path(sys.argv[1])
    ds = shipped_calibration_set()
    for i in range(len(ds)):
        image, label = ds[i]
        folder = out / "train" / ds.class_names[label]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{i:04d}.png")
    print(f"{len(ds)} images in {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
