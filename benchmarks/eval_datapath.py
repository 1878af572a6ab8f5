"""What the data path costs `vmq eval` on a large folder: end-to-end images/s against forward-only, same run.

    python benchmarks/eval_datapath.py [--images 50000] [--format png|jpeg] [--folder DIR]
                                       [--batch-size 64] [--workers N] [--threads N] [--keep] [--json]

Writes ``--images`` CIFAR-sized images (the shipped CIFAR-10 test and calibration images, in
turn) into an ImageNet-layout folder in a temporary directory (or takes ``--folder``), then
measures, one after the other on the same machine:

  (a) ``vmq eval --data FOLDER --json``: images/s of the whole pipeline (reading and decoding in
      the loader's workers, transform, batching, forward, top-k), as the command reports it;
  (b) the same model's forward-only images/s on preloaded tensors of the same batch size, in
      the same loop shape (forward and top-k per batch), with the same threads;
  (c) the data path alone: images/s of ``vmq eval``'s loader over the folder (same workers and
      transform), no model.

Prints both and their ratio (target: end-to-end at least 0.75 of forward-only, i.e. the data
path costs at most a quarter), and the folder's top-1 and image count.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from vmq.cpus import openmp_wait_env  # noqa: E402

os.environ.update(openmp_wait_env())  # as the vmq command sets it, before torch loads OpenMP

import numpy as np  # noqa: E402
import torch  # noqa: E402

from vmq.compress.api import load_model  # noqa: E402
from vmq.data import eval_loader, eval_transform, shipped_calibration_set, shipped_eval_set  # noqa: E402
from vmq.runtime import retain_freed_memory, set_threads  # noqa: E402

TARGET = 0.75


def write_folder(root: Path, n: int, fmt: str) -> Path:
    """``n`` images under ``root/<class>/``, cycling through the shipped CIFAR-10 images."""
    from PIL import Image

    sets = [shipped_eval_set(), shipped_calibration_set()]
    images = np.concatenate([s.images for s in sets])
    labels = np.concatenate([s.labels for s in sets])
    names = sets[0].class_names
    for c in names:
        (root / c).mkdir(parents=True, exist_ok=True)
    ext, opts = (".png", {}) if fmt == "png" else (".jpg", {"quality": 95})
    for i in range(n):
        k = i % len(labels)
        Image.fromarray(images[k]).save(root / names[labels[k]] / f"{i:06d}{ext}", **opts)
    return root


def end_to_end(folder: Path, batch: int, workers, threads) -> dict:
    cmd = [sys.executable, "-m", "vmq_cli.main", "eval", "--data", str(folder), "--batch-size", str(batch), "--json"]
    cmd += ["--workers", str(workers)] if workers is not None else []
    cmd += ["--threads", str(threads)] if threads is not None else []
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return {**json.loads(proc.stdout), "command_seconds": round(time.perf_counter() - start, 2)}


def data_only(folder: Path, batch: int, workers, threads) -> dict:
    """images/s of the data path alone: ``vmq eval``'s loader over the folder (the same workers,
    transform and batching), no model; what the data path could feed a free forward."""
    set_threads(threads)
    model = load_model(None, None).eval()
    loader, _, _ = eval_loader(model, folder, batch_size=batch, workers=workers)
    start, n = time.perf_counter(), 0
    for b in loader:
        n += 0 if b.images is None else b.images.shape[0]
    return {"images_per_sec": round(n / (time.perf_counter() - start), 2), "workers": loader.num_workers}


@torch.no_grad()
def forward_only(batch: int, threads, batches: int, repeats: int) -> dict:
    """images/s of the reference model's forward (and top-k) on one preloaded batch of real images."""
    set_threads(threads)
    retain_freed_memory()  # as vmq eval does
    model = load_model(None, None).eval()
    transform, _ = eval_transform(model)
    ds = shipped_eval_set(transform)
    x = torch.stack([ds[i % len(ds)][0] for i in range(batch)])
    model(x).topk(5, dim=-1)  # warm-up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(batches):
            model(x).topk(5, dim=-1)
        rates.append(batch * batches / (time.perf_counter() - start))
    return {"images_per_sec": round(statistics.median(rates), 2), "threads": torch.get_num_threads(),
            "images": batch * batches, "repeats": repeats}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=50_000, help="images to write (ignored with --folder)")
    ap.add_argument("--format", choices=["png", "jpeg"], default="png")
    ap.add_argument("--folder", type=Path, default=None, help="an existing ImageNet-layout folder to evaluate")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="default: vmq eval's")
    ap.add_argument("--threads", type=int, default=None, help="default: vmq's")
    ap.add_argument("--forward-batches", type=int, default=50, help="batches per forward-only timing")
    ap.add_argument("--repeats", type=int, default=3, help="forward-only timings (the median is reported)")
    ap.add_argument("--keep", action="store_true", help="keep the generated folder (its path is printed)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    tmp = None
    folder = args.folder
    if folder is None:
        tmp = Path(tempfile.mkdtemp(prefix="vmq_eval_datapath_"))
        start = time.perf_counter()
        folder = write_folder(tmp / "val", args.images, args.format)
        print(f"[eval_datapath] wrote {args.images} {args.format} images to {folder} "
              f"in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    try:
        e2e = end_to_end(folder, args.batch_size, args.workers, args.threads)
        threads = args.threads if args.threads is not None else e2e["threads"]
        fwd = forward_only(args.batch_size, threads, args.forward_batches, args.repeats)
        data = data_only(folder, args.batch_size, args.workers, threads)
    finally:
        if tmp is not None and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    ratio = e2e["images_per_sec"] / fwd["images_per_sec"]
    result = {"folder": str(folder), "images": e2e["num_images"], "batch_size": args.batch_size,
              "threads": e2e["threads"], "workers": e2e["workers"], "cpus": os.cpu_count(),
              "end_to_end_images_per_sec": e2e["images_per_sec"], "forward_only_images_per_sec": fwd["images_per_sec"],
              "data_only_images_per_sec": data["images_per_sec"], "ratio": round(ratio, 3), "target": TARGET, "meets_target": ratio >= TARGET, "top1": e2e["top1"],
              "eval_command_seconds": e2e["command_seconds"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"vmq eval on {result['images']} images ({folder}), batch {args.batch_size}, {result['threads']} threads, "
          f"{result['workers']} data workers, {result['cpus']} CPUs")
    e2e_rate, fwd_rate = result["end_to_end_images_per_sec"], result["forward_only_images_per_sec"]
    print(f"  end-to-end (vmq eval)    {e2e_rate:10.1f} images/s   top-1 {result['top1']:.2f} %")
    print(f"  forward-only (preloaded) {fwd_rate:10.1f} images/s")
    print(f"  data path only (no model){result['data_only_images_per_sec']:10.1f} images/s")
    print(f"  ratio end-to-end / forward-only: {ratio:.3f} (target >= {TARGET}: "
          f"{'met' if result['meets_target'] else 'NOT met'})")


if __name__ == "__main__":
    main()
