"""Train one of vmq's reference models on CIFAR-10 (CPU or GPU), resumable; writes weights and a metrics file.

    python scripts/train_reference.py --data ../shared/data/cifar10 --out runs/reference [--model NAME] [--device cuda]

``--model``: a registered 32x32 CIFAR-10 model (default: the Vim reference model). Every selective
scan runs the differentiable training scan of the model's device (the family's
``scan_implementation("train")``: vmq's fused CPU or CUDA scan when vmq._C has it).

The run checkpoints every epoch (``ckpt.pt``) and resumes from it when started again with the
same ``--out``. At the end it writes ``model.safetensors`` and ``metrics.json`` (top-1 on the
full 10000-image test set and on the bit-exact subset, wall time, recipe, seed).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from vmq.models import REFERENCE_MODEL, config_for, create_model, family_for  # noqa: E402
from vmq.models.reference import CIFAR10_MEAN, CIFAR10_STD  # noqa: E402

# parameters without weight decay besides 1-D ones: the SSM's A, position embeddings, cls tokens
NO_DECAY = re.compile(r"(^|\.)(A_log\w*|A_b_log|A_logs|pos_embed|cls_token)$")


def decode_cifar(data_dir: Path, cache: Path):
    """All 60000 JPEGs decoded once to uint8 arrays (cached as .npz beside the run)."""
    if cache.is_file():
        z = np.load(cache, allow_pickle=False)
        return z["train_x"], z["train_y"], z["test_x"], z["test_y"]
    from PIL import Image

    z = np.load(data_dir / "cifar10_jpeg_official_order.npz", allow_pickle=False)
    out = {}
    for split in ("train", "test"):
        blob, off = z[f"{split}_jpeg"], z[f"{split}_offsets"]
        out[f"{split}_x"] = np.stack([
            np.asarray(Image.open(io.BytesIO(blob[off[i]:off[i + 1]].tobytes())).convert("RGB"))
            for i in range(len(off) - 1)
        ])
        out[f"{split}_y"] = z[f"{split}_y"].astype(np.int64)
    tmp = cache.with_suffix(".tmp.npz")
    np.savez(tmp, **out)
    os.replace(tmp, cache)
    return out["train_x"], out["train_y"], out["test_x"], out["test_y"]


def to_tensor(x_uint8: np.ndarray) -> torch.Tensor:
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return (torch.from_numpy(x_uint8).permute(0, 3, 1, 2).float() / 255.0 - mean) / std


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random crop (4-pixel reflect padding) and horizontal flip, on a normalised batch."""
    n = x.shape[0]
    xp = F.pad(x, (4, 4, 4, 4), mode="reflect")
    ox = torch.randint(0, 9, (n,), generator=g)
    oy = torch.randint(0, 9, (n,), generator=g)
    idx = torch.arange(32)
    rows = (oy[:, None] + idx[None]).view(n, 1, 32, 1).expand(n, 3, 32, 40)
    cols = (ox[:, None] + idx[None]).view(n, 1, 1, 32).expand(n, 3, 32, 32)
    out = xp.gather(2, rows).gather(3, cols)
    flip = torch.rand(n, generator=g) < 0.5
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model, x_uint8, y, batch=500):
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(y), batch):
        logits = model(to_tensor(x_uint8[i:i + batch]).to(device))
        correct += (logits.argmax(-1).cpu().numpy() == y[i:i + batch]).sum()
    model.train()
    return 100.0 * correct / len(y)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="folder with cifar10_jpeg_official_order.npz")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default=REFERENCE_MODEL, help="registered model name (32x32 input, 10 classes)")
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--weight-decay", type=float, default=0.05)
    ap.add_argument("--warmup-epochs", type=float, default=0.5)
    ap.add_argument("--label-smoothing", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--limit-steps", type=int, default=0, help="stop after this many steps (smoke test)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:N] (augmentation stays on the CPU)")
    args = ap.parse_args()
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise SystemExit(f"--device must be cpu or cuda[:N], got {args.device!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: no CUDA device here")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)

    train_x, train_y, test_x, test_y = decode_cifar(args.data, args.out / "cifar10_decoded.npz")
    lossless = np.load(args.data / "cifar10_lossless_subset.npz", allow_pickle=False)

    torch.manual_seed(args.seed)
    model = create_model(args.model).train().to(device)
    family = family_for(args.model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.dim() < 2 or NO_DECAY.search(name) else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.999))
    steps_per_epoch = len(train_y) // args.batch_size
    total = steps_per_epoch * args.epochs
    warm = int(args.warmup_epochs * steps_per_epoch)

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    ckpt_path = args.out / "ckpt.pt"
    start_epoch, wall = 0, 0.0
    if ckpt_path.is_file():
        ck = torch.load(ckpt_path, weights_only=True, map_location=device)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start_epoch, wall = int(ck["epoch"]), float(ck["wall"])
        print(f"resumed at epoch {start_epoch} ({wall:.0f} s so far)", flush=True)

    xtrain = to_tensor(train_x)
    ytrain = torch.from_numpy(train_y)
    log = open(args.out / "log.jsonl", "a")
    step = start_epoch * steps_per_epoch
    # the differentiable scan of vmq.ops for the model's device (vmq.ops.training_scan) for the whole run
    with family.scan_implementation(model, "train"):
        for epoch in range(start_epoch, args.epochs):
            g = torch.Generator().manual_seed(args.seed * 1000 + epoch)
            perm = torch.randperm(len(ytrain), generator=g)
            t0, seen_loss = time.time(), 0.0
            for i in range(steps_per_epoch):
                idx = perm[i * args.batch_size:(i + 1) * args.batch_size]
                xb, yb = augment(xtrain[idx], g).to(device), ytrain[idx].to(device)
                for pg in opt.param_groups:
                    pg["lr"] = lr_at(step)
                loss = F.cross_entropy(model(xb), yb, label_smoothing=args.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                step += 1
                seen_loss += loss.item()
                if i % 50 == 0:
                    print(f"epoch {epoch} step {i}/{steps_per_epoch} loss {loss.item():.3f} "
                          f"{(time.time() - t0) / (i + 1):.2f} s/step", flush=True)
                if args.limit_steps and step >= args.limit_steps:
                    break
            wall += time.time() - t0
            acc = evaluate(model, lossless["test_x"], lossless["test_y"].astype(np.int64))
            rec = {"epoch": epoch + 1, "loss": seen_loss / (i + 1), "lossless_top1": acc, "wall_s": wall}
            print(json.dumps(rec), flush=True)
            log.write(json.dumps(rec) + "\n")
            log.flush()
            tmp = ckpt_path.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "epoch": epoch + 1, "wall": wall}, tmp)
            os.replace(tmp, ckpt_path)
            if args.limit_steps and step >= args.limit_steps:
                return

    from safetensors.torch import save_file

    full = evaluate(model, test_x, test_y)
    exact = evaluate(model, lossless["test_x"], lossless["test_y"].astype(np.int64))
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(args.out / "model.tmp"), metadata={"format": "pt"})
    os.replace(args.out / "model.tmp", args.out / "model.safetensors")
    metrics = {"top1_test_10000": full, "top1_lossless_1017": exact, "train_wall_s": wall,
               "epochs": args.epochs, "batch_size": args.batch_size, "lr": args.lr,
               "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
               "label_smoothing": args.label_smoothing, "seed": args.seed, "threads": args.threads,
               "device": str(device),
               "model": args.model, "config": family.config_to_dict(config_for(args.model))}
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics), flush=True)


if __name__ == "__main__":
    main()
