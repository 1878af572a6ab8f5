"""Kernel speed: each compiled vmq kernel against its baseline, timed in the same process.

    python benchmarks/kernels.py [--repeats 7] [--threads 2] [--packed FILE] [--default-allocator] [--json]
                                 [--gpu-only | --scan-only]

CPU cases (always):
* fused bidirectional scan (``vmq::bidirectional_scan``) against the PyTorch reference loop
  (``bidirectional_scan_ref``) at Vim-Ti shapes (d_inner 384, 197 tokens, d_state 16);
* K-direction scan (``vmq::multi_scan``): on Vim's two orders against ``vmq::bidirectional_scan``
  (the kernel it generalises; Vim-Ti shapes, batch 8, token-major inputs), and VMamba's cross scan
  (4 directions sharing a channel-major u, d_state 1, batch 2) against its twin ``multi_scan_ref``
  at stage-1 (56 x 56 tokens, d_inner 192) and stage-3-like (7 x 7, d_inner 1536) shapes;
* INT8 linear (``vmq::int8_linear`` on already quantized activations) against fp32 ``F.linear``
  at the projection shapes of the reference model (64 images x 65 tokens) and of Vim-Ti
  (8 images x 197 tokens);
* the reference model end to end: a packed W8A8 file (``--packed``; by default an RTN W8A8
  file made once under runs/bench/) against the fp32 model, both on the compiled kernels
  (``auto``), batch 64.

GPU cases (when a CUDA device is present and vmq._C has its CUDA kernels; ``--gpu-only`` skips
the CPU ones; benchmarks/_gpu_kernels.py), Vim-B shapes at batch 1 and 64 (M = 197 and 12 608),
timed with CUDA events (triton's ``do_bench``, medians, L2 flushed; else a CUDA-event loop), each
output checked once before it is timed (a mismatch: FAILED, not timed; a baseline that cannot run:
"missing (why)"):
* W8A8 / W4A8 GEMMs (``vmq::int8_linear`` / ``w4a8_linear``: in_proj, x_proj, dt_proj, out_proj)
  against cuBLAS bf16 ``F.linear`` and ``torch._int_mm`` (int32 out: no zero point, scales, bias);
  with the fraction of the dense int8 (wgmma) peak;
* ``quantize_per_token`` against its eager PyTorch twin, with the byte floor;
* ``vmq::multi_scan`` on Vim's two orders (fp32, int8 u / delta, fp16) against
  ``vmq::bidirectional_scan`` (fp32) and two fp16 one-direction scans: mamba-ssm's
  ``selective_scan_fn`` where it imports, else vmq's own fp16 scan (labelled so);
* the training scan's forward + backward (``training_scan("cuda")``) against the reference and
  mamba-ssm's ``selective_scan_fn``;
* the VQ GEMM (``vmq::vq_linear``) against decode + cuBLAS fp16 and cuBLAS on a cached fp16 weight;
* k-means assignment (``vmq::kmeans_assign``) against the chunked-matmul reference.
End to end on GPU: ``vmq bench FILE --device cuda``.

CPU timings: medians of ``--repeats`` timed runs after a warm-up; the two sides of a ratio alternate
run by run, so that drifts of the machine's speed hit both. ``ratio`` is baseline time / kernel time.
"fraction of peak" uses the nominal integer peak of the cores for the int8 path the build took
(``vmq._C.cpu_isa``: avx512-vnni, one 64-product vpdpbusd per cycle; avx2, two 16-product
vpmaddwd per cycle) at the clock /proc/cpuinfo reports: an estimate, which boost clocks exceed.
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


MACS_PER_CYCLE = {"avx512-vnni": 64, "avx2": 32}  # int8 products per cycle and core, by vmq._C.cpu_isa


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

    from vmq.ops.scan import bidirectional_scan, bidirectional_scan_ref

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
        ref = lambda: bidirectional_scan_ref(*args, None, None, None, None, True, True)  # noqa: E731
        t_k, t_r = interleaved([kernel, ref], repeats)
        rows.append({"case": f"scan Vim-Ti b{batch} (d_inner {d}, L {l}, N {n})", "kernel_ms": t_k * 1e3,
                     "baseline": "PyTorch reference loop", "baseline_ms": t_r * 1e3, "ratio": t_r / t_k})


def _multi_scan_args(g, batch, d, n, orders, shared_u):
    """Inputs of vmq::multi_scan as a mixer lays them out: u (batch, d, L) shared by every direction
    (a conv's channel-major output) or token-major per direction; delta, B, C and z token-major
    (what Linear layers produce); D and delta_bias per direction."""
    import torch

    K, L = orders.shape
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    tm = lambda rows: r(batch, L, rows).transpose(1, 2)  # noqa: E731
    u = [r(batch, d, L)] * K if shared_u else [tm(d) for _ in range(K)]
    delta = [(tm(d) * 0.5 - 1) for _ in range(K)]
    A = -torch.exp(r(K, d, n) * 0.5)
    return u, delta, A, [tm(n) for _ in range(K)], [tm(n) for _ in range(K)], r(K, d), r(K, d) * 0.5, tm(d)


def multi_scan_cases(repeats, rows):
    import torch

    from vmq.models.scan_orders import cross_orders, sequence_orders
    from vmq.ops.multi_scan import multi_scan, multi_scan_ref
    from vmq.ops.scan import bidirectional_scan

    g = torch.Generator().manual_seed(0)
    # Vim: the K-direction op on Vim's two orders against the bidirectional kernel it generalises
    batch, d, l, n = 8, 384, 197, 16
    orders = sequence_orders(l)
    u, delta, A, B, C, D, _, z = _multi_scan_args(g, batch, d, n, orders, shared_u=False)
    fused = lambda: multi_scan(u, delta, A, B, C, D, None, z, orders, orders, l, True, "mean", backend="cpu")  # noqa: E731
    bi = lambda: bidirectional_scan(u[0], delta[0], A[0], B[0], C[0], D[0], u[1], delta[1], A[1], B[1], C[1],  # noqa: E731
                                    D[1], z, True, True, backend="cpu")
    t_k, t_b = interleaved([fused, bi], repeats)
    rows.append({"case": f"multi_scan Vim-Ti b{batch} K=2 (d_inner {d}, L {l}, N {n})", "kernel_ms": t_k * 1e3,
                 "baseline": "vmq::bidirectional_scan", "baseline_ms": t_b * 1e3, "ratio": t_b / t_k})
    # VMamba: the cross scan (4 directions, one shared u) at stage-1 and stage-3-like shapes, d_state 1
    for batch, side, d in ((2, 56, 192), (2, 7, 1536)):
        orders = cross_orders(side, side)
        args = _multi_scan_args(g, batch, d, 1, orders, shared_u=True)
        fused = lambda: multi_scan(*args, orders, orders, side * side, True, "sum", backend="cpu")  # noqa: E731
        ref = lambda: multi_scan_ref(*args, orders, orders, None, None, side * side, True, "sum")  # noqa: E731
        t_k, t_r = interleaved([fused, ref], max(1, repeats // 2) if side > 14 else repeats)
        rows.append({"case": f"multi_scan VMamba {side}x{side} b{batch} K=4 (d_inner {d}, N 1)", "kernel_ms": t_k * 1e3,
                     "baseline": "multi_scan_ref (PyTorch loop)", "baseline_ms": t_r * 1e3, "ratio": t_r / t_k})


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
    from vmq.pack.format import load_packed

    q_model, meta = load_packed(packed)
    fp_model = timm.create_model("vim_ref_cifar10", pretrained=True).eval()
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
    ap.add_argument("--gpu-only", action="store_true", help="run the GPU cases only")
    ap.add_argument("--scan-only", action="store_true", help="run the CPU scan cases only (bidirectional, multi_scan)")
    ap.add_argument("--default-allocator", action="store_true",
                    help="leave glibc's malloc settings alone (by default freed memory is retained, as vmq bench "
                         "does: the PyTorch reference loop allocates large tensors and otherwise page-faults them in)")
    args = ap.parse_args()
    import torch

    from vmq.ops import _library

    if _library.NATIVE is None:
        raise SystemExit(f"vmq._C is {_library.NATIVE_ERROR}: build it with `make install`")
    from vmq.runtime import retain_freed_memory

    torch.set_num_threads(args.threads)
    allocator = "default" if args.default_allocator else (
        "freed memory retained" if retain_freed_memory() else "default")  # as vmq bench; both sides of every ratio
    ghz = cpu_ghz()
    isa = getattr(_library.NATIVE, "cpu_isa", "generic")
    peak_int = args.threads * ghz * 1e9 * MACS_PER_CYCLE.get(isa, 1)  # int8 products per second
    rows = []
    if not args.gpu_only:
        scan_cases(args.repeats, rows)
        multi_scan_cases(args.repeats, rows)
    if not args.gpu_only and not args.scan_only:
        linear_cases(args.repeats, rows, peak_int)
        end_to_end(max(5, args.repeats), rows, args.packed or default_packed())
    gpu = None
    if args.scan_only:
        pass  # the CPU scan cases only
    elif torch.cuda.is_available() and _library.has_kernel("int8_linear", "cuda"):
        import _gpu_kernels  # (beside this file)

        gpu = _gpu_kernels.run()
    elif torch.cuda.is_available():
        print("[kernels] a CUDA device is present but vmq._C was built without CUDA kernels: GPU cases skipped",
              file=sys.stderr)
    elif args.gpu_only:
        raise SystemExit("--gpu-only: no CUDA device")
    if args.json:
        print(json.dumps({"threads": args.threads, "cpu_ghz": ghz, "cpu_isa": isa, "allocator": allocator,
                          "rows": rows, **({"gpu_timing": gpu.label, "gpu_rows": gpu.rows} if gpu else {})}, indent=2))
        return
    if rows:
        print(f"threads {args.threads}, nominal clock {ghz:.2f} GHz, int8 path {isa}, allocator: {allocator}")
        print(f"{'case':<62} {'kernel ms':>10} {'baseline ms':>12} {'ratio':>7}  baseline")
    for r in rows:
        extra = f"  ({100 * r['fraction_of_peak']:.0f} % of int peak)" if r.get("fraction_of_peak") else ""
        print(f"{r['case']:<62} {r['kernel_ms']:>10.3f} {r['baseline_ms']:>12.3f} {r['ratio']:>7.2f}  "
              f"{r['baseline']}{extra}")
    if gpu is not None:
        _gpu_kernels.print_rows(gpu)


if __name__ == "__main__":
    main()
