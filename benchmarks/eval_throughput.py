"""Evaluation throughput of the reference model on CPU, against a baseline run in the same process.

    python benchmarks/eval_throughput.py [--model vim_ref_cifar10] [--batch 1,64] [--repeats 5]

Prints images/s (median of --repeats timed runs after a warm-up) for
  * the Vim model's forward pass at each batch size,
  * a timm ViT with the same width, depth and token count (the baseline), and their ratio,
  * the whole `vmq eval` pipeline (data decoding, transform, forward) on the shipped test subset.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402

from vmq.data import eval_loader  # noqa: E402
from vmq.evaluate import evaluate  # noqa: E402
from vmq.models import REFERENCE_MODEL, create_model  # noqa: E402


def images_per_sec(model, batch: int, img: int, repeats: int) -> float:
    x = torch.randn(batch, 3, img, img)
    with torch.no_grad():
        model(x)  # warm-up
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    return batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description="Vim eval throughput vs a same-size ViT, on CPU")
    ap.add_argument("--model", default=REFERENCE_MODEL)
    ap.add_argument("--batch", default="1,64")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    from vmq.runtime import retain_freed_memory

    retain_freed_memory()  # as vmq eval does; the ViT baseline runs under it too
    vim = create_model(args.model if args.model != REFERENCE_MODEL else None).eval()
    cfg = vim.cfg
    vit = timm.create_model("vit_tiny_patch16_224", img_size=cfg.img_size, patch_size=cfg.patch_size,
                            embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=max(1, cfg.embed_dim // 32),
                            num_classes=cfg.num_classes).eval()
    rows = []
    for b in (int(s) for s in args.batch.split(",")):
        v = images_per_sec(vim, b, cfg.img_size, args.repeats)
        t = images_per_sec(vit, b, cfg.img_size, args.repeats)
        rows.append({"batch": b, "vim_images_per_sec": round(v, 1), "vit_images_per_sec": round(t, 1),
                     "vim_over_vit": round(v / t, 3)})
    loader, _, _ = eval_loader(vim, None, batch_size=64)
    e2e = evaluate(vim, loader)
    result = {"model": args.model, "threads": torch.get_num_threads(), "tokens": cfg.num_tokens,
              "vim_params": sum(p.numel() for p in vim.parameters()),
              "vit_params": sum(p.numel() for p in vit.parameters()), "forward": rows,
              "eval_pipeline_images_per_sec": e2e["images_per_sec"], "eval_pipeline_top1": e2e["top1"]}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{args.model}: {cfg.num_tokens} tokens, {result['vim_params']:,} params; "
          f"baseline ViT same width/depth/tokens: {result['vit_params']:,} params; {result['threads']} threads")
    print(f"{'batch':>6} {'Vim img/s':>10} {'ViT img/s':>10} {'Vim/ViT':>8}")
    for r in rows:
        print(f"{r['batch']:>6} {r['vim_images_per_sec']:>10.1f} {r['vit_images_per_sec']:>10.1f} {r['vim_over_vit']:>8.3f}")
    print(f"vmq eval pipeline (shipped {e2e['num_images']} images, batch 64): {e2e['images_per_sec']:.1f} img/s, "
          f"top-1 {e2e['top1']:.2f} %")


if __name__ == "__main__":
    main()
