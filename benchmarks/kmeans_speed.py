"""k-means speed: vmq.ops.kmeans against faiss-cpu, same data, same k, same Lloyd iterations.

    pip install faiss-cpu   # only for this benchmark; vmq does not depend on it
    python benchmarks/kmeans_speed.py [--iterations 20] [--repeats 3] [--threads 2]

Cases are codebook shapes vmq meets (sub-vectors of a Vim-S layer at 1, 2 and 3 bits per weight).
Both sides get the same random initial centroids and run every iteration (no early stop),
unweighted (faiss has no per-coordinate weights). Prints seconds (best of --repeats) and the
ratio vmq / faiss, which the VQ issue requires to be at most 1.5, plus the final mean squared
error of both so that equal work is visible.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [  # (label, points, dim, k)
    ("Vim-S in_proj 1 bit (d=8, K=256)", 1536 * 384 // 8, 8, 256),
    ("Vim-S in_proj 2 bit (d=4, K=256)", 1536 * 384 // 4, 4, 256),
    ("Vim-S in_proj 2 bit (d=2, K=16)", 1536 * 384 // 2, 2, 16),
    ("Vim-S in_proj 3 bit (d=2, K=64)", 1536 * 384 // 2, 2, 64),
    ("Vim-S in_proj 3 bit (d=4, K=4096)", 1536 * 384 // 4, 4, 4096),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--backend", choices=("auto", "cpu", "ref"), default="cpu",
                    help="vmq's assignment: the fused C++ kernel (cpu) or the chunked PyTorch reference (ref)")
    args = ap.parse_args()
    try:
        import faiss
    except ImportError:
        raise SystemExit("faiss-cpu is not installed: pip install faiss-cpu (benchmark only)") from None
    import numpy as np
    import torch

    from vmq.ops.kmeans import assign, kmeans

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    rows = []
    for label, n, d, k in CASES:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, d, generator=g) * torch.linspace(0.5, 2.0, d)
        init = x[torch.randperm(n, generator=g)[:k]].clone()
        xn, initn = x.numpy(), init.numpy()

        def run_vmq():
            return kmeans(x, k, args.iterations, init=init, stop_early=False, backend=args.backend)

        def run_faiss():
            km = faiss.Kmeans(d, k, niter=args.iterations, seed=0, max_points_per_centroid=n, min_points_per_centroid=1,
                              verbose=False, spherical=False, update_index=True)
            km.train(xn, init_centroids=initn)
            return km

        t_vmq, t_faiss = [], []
        for _ in range(args.repeats):
            t = time.perf_counter()
            c, codes = run_vmq()
            t_vmq.append(time.perf_counter() - t)
            t = time.perf_counter()
            km = run_faiss()
            t_faiss.append(time.perf_counter() - t)
        mse_vmq = float(((x - c[codes]) ** 2).sum(1).mean())
        fc = torch.from_numpy(np.ascontiguousarray(km.centroids))
        mse_faiss = float(((x - fc[assign(x, fc)]) ** 2).sum(1).mean())
        rows.append({"case": label, "points": n, "dim": d, "k": k, "iterations": args.iterations,
                     "vmq_s": round(min(t_vmq), 3), "faiss_s": round(min(t_faiss), 3),
                     "ratio_vmq_over_faiss": round(min(t_vmq) / min(t_faiss), 2),
                     "mse_vmq": round(mse_vmq, 5), "mse_faiss": round(mse_faiss, 5)})
        print(json.dumps(rows[-1]), flush=True)
    worst = max(r["ratio_vmq_over_faiss"] for r in rows)
    print(json.dumps({"threads": args.threads, "backend": args.backend, "worst_ratio": worst, "target": 1.5,
                      "met": worst <= 1.5}))


if __name__ == "__main__":
    main()
