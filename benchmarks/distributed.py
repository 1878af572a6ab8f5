"""One process against N (torchrun, gloo on the CPU) on the reference model: the figures must agree.

Runs, each once as one process and once under ``torchrun --nproc-per-node N`` (both with
OMP_NUM_THREADS=1, torchrun's default per process):

- ``vmq eval`` on the shipped test set: top-1, top-5 and image count (must be equal);
- ``vmq calibrate``: minima, maxima and counts (must be equal) and the largest relative
  difference of the float64 second-moment sums;
- ``vmq quantize`` W4A8 with PTS (no learning): whether the packed files are the same bytes;
- ``vmq quantize`` with a recipe (default configs/w4a8.yaml, PTQ4VM): the recorded figures of
  both runs, whether the packed files are the same bytes, and the top-1 agreement and logit SNR
  between the two packed models on the shipped test set;
- ``vmq vq`` (default configs/vq-2bit.yaml, ViM-VQ search): whether the packed files are the
  same bytes.

Prints one JSON document. ``--quick``: 32 calibration images, 5 JLSS steps, 12 VQ search steps
(a few minutes on 2 cores).

    python benchmarks/distributed.py [--nproc 2] [--quick] [--recipe configs/w4a8.yaml]
        [--vq-recipe configs/vq-2bit.yaml] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, OMP_NUM_THREADS="1")


def vmq(args, nproc: int = 1) -> dict:
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *launcher, "-m", "vmq_cli.main", *map(str, args)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    if r.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout)


def agreement_of(a: Path, b: Path) -> dict:
    from vmq.data import eval_loader
    from vmq.evaluate import evaluate
    from vmq.metrics import agreement
    from vmq.pack.format import load_packed

    logits = []
    for path in (a, b):
        model, _ = load_packed(path)
        loader, _, _ = eval_loader(model, None, 128)
        logits.append(evaluate(model, loader, keep_logits=True)["logits"])
    return {**agreement(logits[0], logits[1]), "images": int(logits[0].shape[0])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--recipe", default="configs/w4a8.yaml")
    ap.add_argument("--vq-recipe", default="configs/vq-2bit.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[])
    args = ap.parse_args()
    from vmq.calib import CalibStats

    n = args.nproc
    small = ["calibration.num_images=32", "calibration.batch_size=8", "quantization.truncation.num_images=16",
             "quantization.jlss.iterations=5"] if args.quick else []
    sets = small + args.sets
    flags = [x for s in sets for x in ("--set", s)]
    flags_vq = [x for s in [s for s in sets if not s.startswith("quantization.")]
                + (["vq.search.iterations=12"] if args.quick else []) for x in ("--set", s)]
    report = {"nproc": n, "recipe": args.recipe, "sets": sets}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one, many = vmq(["eval", "--json"]), vmq(["eval", "--json"], n)
        report["eval"] = {k: [one[k], many[k]] for k in ("top1", "top5", "num_images", "images_per_sec")}
        report["eval"]["equal"] = all(one[k] == many[k] for k in ("top1", "top5", "num_images"))

        cal = ["calibrate", "--json", *(["--num-images", "32", "--batch-size", "8"] if args.quick else [])]
        vmq([*cal, "--out", tmp / "s1.safetensors"])
        vmq([*cal, "--out", tmp / "s2.safetensors"], n)
        s1, s2 = CalibStats.load(tmp / "s1.safetensors"), CalibStats.load(tmp / "s2.safetensors")
        exact = all(torch.equal(a.min, s2.layers[k].min) and torch.equal(a.max, s2.layers[k].max)
                    and a.count == s2.layers[k].count for k, a in s1.layers.items())
        rel = max(((a.sq_sum - s2.layers[k].sq_sum).abs() / a.sq_sum.abs().clamp(min=1e-300)).max().item()
                  for k, a in s1.layers.items())
        report["calibrate"] = {"layers": len(s1.layers), "min_max_count_equal": exact, "sq_sum_max_rel_diff": rel}

        pts = ["quantize", "--recipe", args.recipe, *flags, "--set", "quantization.method=pts", "--no-eval", "--json"]
        vmq([*pts, "--out", tmp / "p1.safetensors"])
        vmq([*pts, "--out", tmp / "p2.safetensors"], n)
        report["pts_same_bytes"] = (tmp / "p1.safetensors").read_bytes() == (tmp / "p2.safetensors").read_bytes()

        q = ["quantize", "--recipe", args.recipe, *flags, "--json"]
        r1 = vmq([*q, "--out", tmp / "q1.safetensors"])
        r2 = vmq([*q, "--out", tmp / "q2.safetensors"], n)
        keys = ("fp_top1", "quant_top1", "top1_agreement", "logit_snr_db", "eval_images", "quantize_seconds")
        report["quantize"] = {k: [r1.get(k), r2.get(k)] for k in keys}
        report["quantize"]["same_bytes"] = (tmp / "q1.safetensors").read_bytes() == (tmp / "q2.safetensors").read_bytes()
        report["quantize"]["one_vs_n"] = agreement_of(tmp / "q1.safetensors", tmp / "q2.safetensors")

        v = ["vq", "--recipe", args.vq_recipe, *flags_vq, "--no-eval", "--json"]
        v1 = vmq([*v, "--out", tmp / "v1.safetensors"])
        vmq([*v, "--out", tmp / "v2.safetensors"], n)
        report["vq"] = {"recipe": args.vq_recipe, "vq_seconds": v1.get("vq_seconds"),
                        "same_bytes": (tmp / "v1.safetensors").read_bytes() == (tmp / "v2.safetensors").read_bytes()}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
