"""Quantize a full-size Vim (random weights) with a PTQ recipe: wall time and peak memory.

No accuracy is measured (the weights are random); this shows that ``vmq quantize`` runs at
full size and what it costs. It writes random weights and random 224x224 images into --work,
then runs ``vmq quantize --no-eval --json`` in a child process and reports the child's peak
resident memory (``ru_maxrss``) beside the size of the model's fp32 weights.

    python benchmarks/ptq_full_size.py [--model vim_small] [--recipe configs/w8a8.yaml]
        [--num-images 64] [--set quantization.jlss.iterations=20 ...]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vim_small")
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "w8a8.yaml")
    ap.add_argument("--num-images", type=int, default=64)
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "ptq_full_size")
    args = ap.parse_args()

    import numpy as np
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import save_file

    import vmq.models  # noqa: F401
    from vmq.data import model_label_names

    args.work.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = timm.create_model(args.model).eval()
    ckpt = args.work / f"{args.model}_random.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt))
    fp_bytes = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    size = model.cfg.img_size
    folder = args.work / "images" / model_label_names(model)[0]
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(args.num_images):
        path = folder / f"{i:04d}.png"
        if not path.exists():
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    del model

    out = args.work / f"{args.model}-quantized.safetensors"
    sets = [f"model.name={args.model}", f"model.checkpoint={ckpt}", f"calibration.data={args.work / 'images'}",
            f"calibration.num_images={args.num_images}", *args.overrides]
    cmd = [sys.executable, "-m", "vmq_cli.main", "quantize", "--recipe", str(args.recipe), "--out", str(out),
           "--no-eval", "--json"] + [a for s in sets for a in ("--set", s)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)  # progress lines pass through stderr
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"quantize failed with exit code {proc.returncode}")
    result = json.loads(proc.stdout)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # Linux reports KiB
    summary = {
        "model": args.model,
        "recipe": str(args.recipe.relative_to(ROOT)) if args.recipe.is_relative_to(ROOT) else str(args.recipe),
        "overrides": args.overrides,
        "calibration_images": args.num_images,
        "quantize_seconds": result["quantize_seconds"],
        "command_seconds": round(wall, 1),
        "peak_rss_bytes": peak,
        "fp32_weights_bytes": fp_bytes,
        "peak_rss_over_fp32_weights": round(peak / fp_bytes, 2),
        "packed_bytes": result["file_bytes"],
        "packed_over_fp32": round(result["file_bytes"] / fp_bytes, 3),
        "layers": len(result["layers"]),
        "torch_threads": torch.get_num_threads(),
    }
    (args.work / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
