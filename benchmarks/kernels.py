"""Kernel speed: each compiled vmq kernel against its baseline, timed in the same process.

    python benchmarks/kernels.py [--repeats 7] [--threads 2] [--packed FILE] [--json]

CPU cases (always):
* fused bidirectional scan (``vmq::bidirectional_scan``) against the PyTorch reference loop
  (``bidirectional_scan_quantized_ref``) at Vim-Ti shapes (d_inner 384, 197 tokens, d_state 16);
* INT8 linear (``vmq::int8_linear`` on already quantized activations) against fp32 ``F.linear``
  at the projection shapes of the reference model (64 images x 65 tokens) and of Vim-Ti
  (8 images x 197 tokens);
* the reference model end to end: a packed W8A8 file (``--packed``; by default an RTN W8A8
  file made once under runs/bench/) against the fp32 model, both on the compiled kernels
  (``auto``), batch 64.

GPU cases run when a CUDA device is present and vmq._C has CUDA kernels (none yet: see README).
Medians of ``--repeats`` timed runs after a warm-up; the two sides of a ratio alternate run by
run, so that drifts of the machine's speed hit both. ``ratio`` is baseline time / kernel time.
"fraction of peak" uses the nominal peak of the cores (fp32: 2 FMA x 8 lanes per cycle; int16
pair products: 2 x 16 per cycle) at the clock /proc/cpuinfo reports: an estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def interleaved(fns, repeats):
    """Median seconds of each function, runs alternating between them after one warm-up each."""
    for f in fns:
        f()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            t = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - t)
    return [sorted(t)[len(t) // 2] for t in times]


def cpu_ghz() -> float:
    try:
        with open("/proc/cpuinfo") as f:
            mhz = [float(line.split(":")[1]) for line in f if line.startswith("cpu MHz")]
        return max(mhz) / 1000 if mhz else float("nan")
    except OSError:
        return float("nan")


def scan_cases(repeats, rows):
    import torch

    from vmq.ops.scan import bidirectional_scan, bidirectional_scan_quantized_ref

    for batch in (1, 8):
        d, l, n = 384, 197, 16
        g = torch.Generator().manual_seed(0)
        r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
        args = []
        for _ in range(2):
            # as the mixer produces them: u (b, d, l) contiguous, delta token-major
            args += [r(batch, d, l), (r(batch, l, d) * 0.5 - 1).transpose(1, 2), -torch.exp(r(d, n) * 0.5),
                     r(batch, l, n).transpose(1, 2), r(batch, l, n).transpose(1, 2), r(d)]
        args.append(r(batch, l, d).transpose(1, 2))
        kernel = lambda: bidirectional_scan(*args, delta_softplus=True, backend="cpu")  # noqa: E731
        ref = lambda: bidirectional_scan_quantized_ref(*args, delta_softplus=True)  # noqa: E731
        t_k, t_r = interleaved([kernel, ref], repeats)
        rows.append({"case": f"scan Vim-Ti b{batch} (d_inner {d}, L {l}, N {n})", "kernel_ms": t_k * 1e3,
                     "baseline": "PyTorch reference loop", "baseline_ms": t_r * 1e3, "ratio": t_r / t_k})


def linear_cases(repeats, rows, peak_int):
    import torch
    import torch.nn.functional as F

    from vmq.ops.linear import int8_linear

    shapes = [("ref model in_proj", 64 * 65, 96, 384), ("ref model x_proj", 64 * 65, 192, 38),
              ("ref model dt_proj", 64 * 65, 6, 192), ("ref model out_proj", 64 * 65, 192, 96),
              ("Vim-Ti in_proj", 8 * 197, 192, 768), ("Vim-Ti x_proj", 8 * 197, 384, 44),
              ("Vim-Ti out_proj", 8 * 197, 384, 192)]
    for label, m, k, n in shapes:
        g = torch.Generator().manual_seed(0)
        x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8, generator=g)
        zp = torch.randint(0, 256, (m,), dtype=torch.int32, generator=g)
        xs, ws = torch.rand(m, generator=g), torch.rand(n, generator=g)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
        x, wf = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        kernel = lambda: int8_linear(x_q, xs, zp, w, ws, None, backend="cpu")  # noqa: E731
        base = lambda: F.linear(x, wf)  # noqa: E731
        t_k, t_b = interleaved([kernel, base], repeats)
        rows.append({"case": f"int8 linear {label} ({m}x{k} @ {k}x{n})", "kernel_ms": t_k * 1e3,
                     "baseline": "fp32 F.linear", "baseline_ms": t_b * 1e3, "ratio": t_b / t_k,
                     "fraction_of_peak": m * k * n / t_k / peak_int})


def end_to_end(repeats, rows, packed):
    import timm
    import torch

    import vmq.models  # noqa: F401
    from vmq.ops.backend import set_backend
    from vmq.pack.format import load_packed

    q_model, meta = load_packed(packed)
    fp_model = timm.create_model("vim_ref_cifar10", pretrained=True)
    for m in (q_model, fp_model):
        set_backend(m.eval(), "auto")
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        t_q, t_f = interleaved([lambda: q_model(x), lambda: fp_model(x)], repeats)
    scheme = meta.get("results", {}).get("scheme") or "quantized"
    rows.append({"case": f"reference model end to end, batch 64 ({scheme} vs fp32)", "kernel_ms": t_q * 1e3,
                 "baseline": "fp32 model (fused scan)", "baseline_ms": t_f * 1e3, "ratio": t_f / t_q})


def default_packed() -> Path:
    out = ROOT / "runs" / "bench" / "vim_ref_cifar10-w8a8-rtn.safetensors"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"[kernels] making {out} (RTN W8A8, once)", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "vmq_cli.main", "quantize", "--recipe", str(ROOT / "configs/w8a8.yaml"),
                        "--set", "quantization.method=rtn", "--no-eval", "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--packed", type=Path, default=None, help="packed file for the end-to-end case")
    ap.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = ap.parse_args()
    import torch

    from vmq.ops import _library

    if _library.NATIVE is None:
        raise SystemExit(f"vmq._C is {_library.NATIVE_ERROR}: build it with `make install`")
    torch.set_num_threads(args.threads)
    ghz = cpu_ghz()
    peak_int = args.threads * ghz * 1e9 * 32  # int16 pair products (MACs) per second
    rows = []
    scan_cases(args.repeats, rows)
    linear_cases(args.repeats, rows, peak_int)
    end_to_end(max(3, args.repeats // 2), rows, args.packed or default_packed())
    if torch.cuda.is_available() and not _library.has_kernel("int8_linear", "cuda"):
        print("[kernels] a CUDA device is present but vmq._C has no CUDA kernels yet: GPU cases skipped",
              file=sys.stderr)
    if args.json:
        print(json.dumps({"threads": args.threads, "cpu_ghz": ghz, "rows": rows}, indent=2))
        return
    print(f"threads {args.threads}, nominal clock {ghz:.2f} GHz")
    print(f"{'case':<62} {'kernel ms':>10} {'baseline ms':>12} {'ratio':>7}  baseline")
    for r in rows:
        extra = f"  ({100 * r['fraction_of_peak']:.0f} % of int peak)" if "fraction_of_peak" in r else ""
        print(f"{r['case']:<62} {r['kernel_ms']:>10.3f} {r['baseline_ms']:>12.3f} {r['ratio']:>7.2f}  "
              f"{r['baseline']}{extra}")


if __name__ == "__main__":
    main()
