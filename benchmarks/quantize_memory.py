"""Peak memory of ``vmq quantize`` (W4A8 PTQ4VM) on a full-size Vim with random weights, on the CPU.

Each measurement is one child process (``vmq quantize --no-eval --json``) whose peak resident
memory (``ru_maxrss`` from ``wait4``, so each child is measured on its own) is reported beside
baselines measured in the same run:

- ``model only``: a child that imports vmq and builds the same model (the floor: torch, the
  interpreter, the fp32 weights);
- ``unbounded``: every block activation in memory (no ``--max-memory``);
- ``bounded``: ``--max-memory SIZE --offload-dir DIR`` (activations past SIZE go to files).

The calibration images are synthetic (smooth gradients with noise, PNG) in a temporary
ImageNet-layout folder; labels are unused by calibration, and nothing outside this repository
is read. ``--scaling`` adds short runs over image counts and model widths and fits, per run,
``peak - model_only = a + b * images * tokens * width`` (bytes), to show how the peak grows.

Shortening (peak memory does not depend on either; the output says what was shortened):
``--jlss-iterations K`` (the recipe's 100 JLSS steps per block take hours on a small CPU; one
step already allocates everything a step does) and ``--blocks N`` (only the last N blocks are
quantized: every block still runs over all the images, the blocks before them on the
floating-point path only, as their floating-point and quantized inputs are the same; all blocks have the same shapes, and from the
second quantized block on the engine holds what it holds in the middle of a full run). Full
measurement, roughly 1 to 1.5 hours on a quiet 2-core CPU (each Vim-B run makes about 50 block
passes over the 256 images; without ``--scaling`` roughly 50 minutes):

    python benchmarks/quantize_memory.py --model vim_base --num-images 256 --blocks 2 --scaling

Tiny check (a minute): ``python benchmarks/quantize_memory.py --model test_vim --num-images 16 --blocks 1``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
TARGET_LAYERS = r"(in_proj|x_proj|x_proj_b|dt_proj|dt_proj_b|out_proj)$"


def make_images(folder: Path, count: int, size: int) -> Path:
    """``count`` synthetic RGB images (``size`` x ``size``) in ``folder``/train/synthetic/."""
    import numpy as np
    from PIL import Image

    cls = folder / "train" / "synthetic"
    cls.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    for i in range(count):
        path = cls / f"{i:05d}.png"
        if path.exists():
            continue
        a, b, c = rng.uniform(0, 255, 3)
        img = a * ramp[None, :, None] + b * ramp[:, None, None] + c * rng.uniform(0, 1, (1, 1, 3))
        img = np.clip(img / 2 + rng.normal(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(path)
    return folder


def peak_of(cmd: List[str], log: Path) -> Dict[str, object]:
    """Run ``cmd``; its exit status, wall time, peak RSS (bytes) and stdout."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"rc": proc.returncode, "seconds": round(time.perf_counter() - start, 1),
            "peak_rss_bytes": usage.ru_maxrss * 1024, "stdout": log.read_text()}  # Linux: KiB


def model_only(model: str) -> Dict[str, object]:
    code = ("import sys; from vmq.compress.api import load_model; m = load_model(sys.argv[1], 'random'); "
            "print(sum(p.numel() * p.element_size() for p in m.state_dict().values()))")
    with tempfile.TemporaryDirectory() as tmp:
        r = peak_of([sys.executable, "-c", code, model], Path(tmp) / "log")
    if r["rc"] != 0:
        raise SystemExit(f"building {model} failed")
    return {"peak_rss_bytes": r["peak_rss_bytes"], "fp32_weights_bytes": int(str(r["stdout"]).split()[-1])}


def quantize(model: str, data: Path, num_images: int, args: argparse.Namespace, work: Path, tag: str,
             max_memory: Optional[str] = None) -> Dict[str, object]:
    sets = [f"model.name={model}", "model.checkpoint=random", f"calibration.data={data}",
            f"calibration.num_images={num_images}", f"quantization.jlss.iterations={args.jlss_iterations}"]
    if args.blocks is not None:
        depth = tokens_width(model)[3]
        blocks = "|".join(str(i) for i in range(max(0, depth - args.blocks), depth))
        sets.append(f"quantization.targets=['re:layers\\.({blocks})\\.mixer\\.{TARGET_LAYERS}']")
    cmd = [sys.executable, "-m", "vmq_cli.main", "quantize", "--recipe", str(args.recipe), "--no-eval", "--json",
           "--out", str(work / f"{tag}.safetensors")] + [a for s in sets + args.overrides for a in ("--set", s)]
    if max_memory is not None:
        cmd += ["--max-memory", max_memory, "--offload-dir", str(work / f"{tag}-offload")]
    print(f"-- {tag}: {model}, {num_images} images{', --max-memory ' + max_memory if max_memory else ''}",
          file=sys.stderr, flush=True)
    r = peak_of(cmd, work / f"{tag}.json")
    if r["rc"] != 0:
        raise SystemExit(f"{tag}: vmq quantize failed with exit code {r['rc']}")
    result = json.loads(str(r["stdout"]))
    return {"peak_rss_bytes": r["peak_rss_bytes"], "command_seconds": r["seconds"],
            "quantize_seconds": result["quantize_seconds"], "layers": len(result["layers"]),
            "activations": result["activations"], "file_bytes": result["file_bytes"]}


def tokens_width(model: str) -> tuple:
    import vmq.models  # noqa: F401
    from vmq.models import config_for

    cfg = config_for(model)
    side = (cfg.img_size - cfg.patch_size) // cfg.stride + 1
    return side * side + int(cfg.if_cls_token), cfg.embed_dim, cfg.img_size, cfg.depth


def fit(points: List[Dict[str, float]]) -> Dict[str, float]:
    """Least squares of ``extra = a + b * x`` (x = images * tokens * width)."""
    n = len(points)
    mx = sum(p["x"] for p in points) / n
    my = sum(p["extra"] for p in points) / n
    sxx = sum((p["x"] - mx) ** 2 for p in points)
    b = sum((p["x"] - mx) * (p["extra"] - my) for p in points) / sxx if sxx else 0.0
    return {"a_bytes": round(my - b * mx), "b_bytes_per_image_token_channel": round(b, 2)}


def gb(x: float) -> str:
    return f"{x / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="vim_base")
    ap.add_argument("--num-images", type=int, default=256)
    ap.add_argument("--recipe", type=Path, default=ROOT / "configs" / "w4a8.yaml")
    ap.add_argument("--jlss-iterations", type=int, default=2)
    ap.add_argument("--blocks", type=int, default=None, help="quantize only the last N blocks (default: all)")
    ap.add_argument("--max-memory", default="256MiB", help="the bounded run's --max-memory")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    ap.add_argument("--scaling", action="store_true", help="also fit the peak over image counts and widths")
    ap.add_argument("--scaling-models", default="vim_tiny,vim_small,vim_base")
    ap.add_argument("--scaling-images", default="16,32,64")
    ap.add_argument("--work", type=Path, default=None, help="keep images and outputs here (default: a temp dir)")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="vmq-quantize-memory-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokens, width, size, _ = tokens_width(args.model)
        counts = [int(c) for c in args.scaling_images.split(",")] if args.scaling else []
        data = make_images(work / "images", max([args.num_images] + counts), size)
        base = model_only(args.model)
        free = quantize(args.model, data, args.num_images, args, work, "unbounded")
        bounded = quantize(args.model, data, args.num_images, args, work, "bounded", args.max_memory)
        same = (work / "unbounded.safetensors").read_bytes() == (work / "bounded.safetensors").read_bytes()
        summary: Dict[str, object] = {
            "model": args.model, "tokens": tokens, "width": width, "image_size": size,
            "calibration_images": args.num_images,
            "recipe": str(args.recipe.relative_to(ROOT)) if args.recipe.is_relative_to(ROOT) else str(args.recipe),
            "shortened": {"jlss_iterations": args.jlss_iterations,
                          "quantized_blocks": "all" if args.blocks is None else f"last {args.blocks}",
                          "overrides": args.overrides},
            "model_only": base, "unbounded": free, "bounded": dict(bounded, max_memory=args.max_memory),
            "bounded_over_unbounded": round(bounded["peak_rss_bytes"] / free["peak_rss_bytes"], 3),
            "unbounded_over_model_only": round(free["peak_rss_bytes"] / base["peak_rss_bytes"], 2),
            "bounded_over_model_only": round(bounded["peak_rss_bytes"] / base["peak_rss_bytes"], 2),
            "packed_files_identical": same, "cpus": os.cpu_count(),
        }
        if args.scaling:
            points = []
            for model in args.scaling_models.split(","):
                t, w, s, _ = tokens_width(model)
                floor = model_only(model)["peak_rss_bytes"]
                scaling_data = make_images(work / f"images{s}", max(counts), s) if s != size else data
                for n in counts:
                    r = quantize(model, scaling_data, n, args, work, f"scale-{model}-{n}")
                    points.append({"model": model, "images": n, "tokens": t, "width": w, "x": n * t * w,
                                   "model_only": floor, "peak": r["peak_rss_bytes"],
                                   "extra": r["peak_rss_bytes"] - floor})
            summary["scaling"] = {"points": points, "fit": fit(points)}
        (work / "summary.json").write_text(json.dumps(summary, indent=2))
        print(json.dumps(summary, indent=2))
        print(f"\n{args.model} ({width} wide, {tokens} tokens), {args.num_images} images, W4A8 PTQ4VM on the CPU; "
              f"shortened: {args.jlss_iterations} JLSS steps per block, "
              f"{'all' if args.blocks is None else f'the last {args.blocks}'} blocks quantized")
        print(f"  model only            {gb(base['peak_rss_bytes'])}  (fp32 weights {gb(base['fp32_weights_bytes'])})")
        print(f"  quantize, unbounded   {gb(free['peak_rss_bytes'])}  = {summary['unbounded_over_model_only']} x model only")
        print(f"  quantize, --max-memory {args.max_memory} --offload-dir: {gb(bounded['peak_rss_bytes'])}  "
              f"= {summary['bounded_over_unbounded']} x unbounded, {summary['bounded_over_model_only']} x model only "
              f"({gb(bounded['activations']['offloaded_bytes'])} written to files); same packed bytes: {same}")
        if args.scaling:
            f = summary["scaling"]["fit"]
            print(f"  peak - model only ~ {gb(f['a_bytes'])} + {f['b_bytes_per_image_token_channel']} B x images x "
                  "tokens x width (unbounded runs):")
            for p in summary["scaling"]["points"]:
                print(f"    {p['model']:>10} ({p['width']:4d} wide) {p['images']:4d} images: peak {gb(p['peak'])}, "
                      f"over model only {gb(p['extra'])}")


if __name__ == "__main__":
    main()
