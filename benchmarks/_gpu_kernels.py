"""GPU cases of benchmarks/kernels.py: each vmq CUDA kernel against labelled baselines, at batch 1 and 64.

Timing: ``triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")`` (CUDA events
around each call, L2 flushed in between) when triton imports, else a CUDA-event loop of the same
kind; ``wall ms`` is back-to-back calls timed on the host, so launch and wrapper overhead show.
Each output is checked once before it is timed, the kernel against its twin and a baseline against
a reference: a mismatch makes the row FAILED and it is not timed; a baseline that cannot run here
is "missing (why)". ``ratio`` = baseline ms / kernel ms, both measured in this run (> 1: vmq faster).
Shapes: Vim-B (d_model 768, d_inner 1536, 197 tokens): M = 197 (batch 1) and 12 608 (batch 64).
"""

from __future__ import annotations

import functools
import statistics
import time
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from vmq.models.scan_orders import sequence_orders
from vmq.ops.kmeans import assign, assign_ref
from vmq.ops.linear import (int8_linear, int8_linear_ref, pack_int4, vq_dequantize_ref, vq_linear, vq_linear_ref,
                            w4a8_linear, w4a8_linear_ref)
from vmq.ops.multi_scan import multi_scan, multi_scan_ref
from vmq.ops.quantize import quantize_per_token, quantize_per_token_ref
from vmq.ops.scan import bidirectional_scan
from vmq.ops.scan_ref import selective_scan_ref
from vmq.ops.scan_train import training_scan

DEV = "cuda"
HBM_BYTES_PER_S = 4.3e12  # device-to-device copy measured on an H200 (read + write)
INT8_PEAK = {"H100 PCIe": 1513e12, "H100": 1979e12, "H200": 1979e12, "A100": 624e12}  # dense int8 ops/s (wgmma)
GEMMS = (("in_proj", 768, 3072), ("x_proj", 1536, 80), ("dt_proj", 48, 1536), ("out_proj", 1536, 768))
BATCHES = (1, 64)


def timer():
    """(label, fn -> median ms): triton's do_bench, else a CUDA-event loop."""
    try:
        from triton.testing import do_bench
    except Exception as exc:  # noqa: BLE001  (not installed, or no driver for it)
        return f"CUDA-event loop, median of 30 (triton does not import: {exc})", event_median
    return "triton do_bench, median, L2 flushed", lambda fn: do_bench(fn, warmup=10, rep=50, return_mode="median")


def event_median(fn: Callable, warmup: int = 5, reps: int = 30) -> float:
    flush = torch.empty(256 << 20, dtype=torch.int8, device=DEV)
    for _ in range(warmup):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in events)


def wall_ms(fn: Callable, device_ms: float) -> float:
    calls = max(3, min(50, int(50 / max(device_ms, 1e-3))))
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / calls * 1e3


def same(got, want) -> Optional[str]:
    if got.shape == want.shape and torch.equal(got, want):
        return None
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    return f"{(got != want).sum().item()} of {want.numel()} values differ"


def close(got, want, rel: float) -> Optional[str]:
    got, want = got.float(), want.float()
    if got.shape != want.shape:
        return f"shape {tuple(got.shape)} != {tuple(want.shape)}"
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        return "non-finite values where the reference has none (or the reverse)"
    err = ((got - want).nan_to_num().norm() / want.nan_to_num().norm().clamp_min(1e-30)).item()
    return None if err <= rel else f"relative error {err:.1e} > {rel:.0e}"


class Table:
    def __init__(self):
        self.label, self.measure = timer()
        self.rows: List[dict] = []
        name = torch.cuda.get_device_name()
        self.peak = next((v for k, v in INT8_PEAK.items() if k in name), None)

    def case(self, case: str, kernel: Callable, check: Callable, baselines=(), note: str = "",
             ops: Optional[float] = None) -> None:
        """``check()`` -> None or what is wrong; ``baselines``: (label, fn or why it is missing, check or None);
        ``ops``: integer operations of one call, for the fraction of the device's dense int8 peak."""
        problem = self._problem(check)
        if problem:
            self.rows.append({"case": case, "status": f"FAILED, not timed: {problem}"})
            return
        t = self.measure(kernel)
        if ops and self.peak:
            note = f"{ops / (t * 1e-3) / self.peak:.0%} of the dense int8 peak (wgmma)"
        row = {"case": case, "kernel_ms": t, "wall_ms": wall_ms(kernel, t), "note": note}
        if not baselines:
            self.rows.append(dict(row, baseline="-"))
        for label, fn, bcheck in baselines:
            if isinstance(fn, str):
                self.rows.append(dict(row, baseline=label, status=f"missing ({fn})"))
                continue
            problem = self._problem(bcheck) if bcheck else None
            if problem:
                self.rows.append(dict(row, baseline=label, status=f"baseline FAILED, not timed: {problem}"))
                continue
            tb = self.measure(fn)
            self.rows.append(dict(row, baseline=label, baseline_ms=tb, ratio=tb / t))

    @staticmethod
    def _problem(check: Callable) -> Optional[str]:
        try:
            return check()
        except Exception as exc:  # noqa: BLE001  (a kernel that raises is a failed row, not a crash)
            return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def gemm_cases(t: Table, gen) -> None:
    for batch in BATCHES:
        m = batch * 197
        for label, k, n in GEMMS:
            x_q = torch.randint(0, 256, (m, k), dtype=torch.uint8, device=DEV, generator=gen)
            zp = torch.randint(0, 256, (m,), dtype=torch.int32, device=DEV, generator=gen)
            xs, ws = torch.rand(m, device=DEV, generator=gen) * 0.01, torch.rand(n, device=DEV, generator=gen) * 0.01
            w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV, generator=gen)
            w4 = pack_int4(w)
            xb, wb = torch.randn(m, k, device=DEV, dtype=torch.bfloat16), torch.randn(n, k, device=DEV,
                                                                                      dtype=torch.bfloat16)
            xi = (x_q.to(torch.int16) - 128).to(torch.int8)  # _int_mm takes signed activations
            bf16 = ("cuBLAS bf16 F.linear (bf16 out)", lambda: F.linear(xb, wb),
                    lambda: close(F.linear(xb, wb), xb.float() @ wb.float().t(), 1e-2))
            int_mm = ("torch._int_mm (int32 out; no zero point, scales, bias)",
                      (lambda: torch._int_mm(xi, w.t())) if m > 16 and k % 8 == 0 and n % 8 == 0
                      else "needs M > 16 and K, N multiples of 8",
                      lambda: same(torch._int_mm(xi, w.t()), (xi.double() @ w.double().t()).int()))
            shape = f"b{batch} {label} ({m}x{k} @ {k}x{n})"
            kern8 = lambda: int8_linear(x_q, xs, zp, w, ws, None, backend="cuda")  # noqa: E731
            t.case(f"W8A8 GEMM {shape}", kern8, lambda: same(kern8(), int8_linear_ref(x_q, xs, zp, w, ws)),
                   [bf16, int_mm], ops=2 * m * k * n)
            kern4 = lambda: w4a8_linear(x_q, xs, zp, w4, ws, None, backend="cuda")  # noqa: E731
            t.case(f"W4A8 GEMM {shape}", kern4, lambda: same(kern4(), w4a8_linear_ref(x_q, xs, zp, w4, ws)),
                   [bf16, ("vmq int8_linear, same shape", kern8, None)], ops=2 * m * k * n)


def quantize_cases(t: Table, gen) -> None:
    for batch in BATCHES:
        x = torch.randn(batch, 197, 1536, device=DEV, generator=gen) * 3
        s = torch.rand(197, device=DEV, generator=gen) * 0.05 + 0.01
        z = torch.randint(0, 256, (197,), dtype=torch.int32, device=DEV, generator=gen)
        kern = lambda: quantize_per_token(x, s, z, 8, backend="cuda")  # noqa: E731
        floor = 5 * x.numel() / HBM_BYTES_PER_S * 1e3
        t.case(f"quantize_per_token b{batch} (197 x 1536)", kern, lambda: same(kern(), quantize_per_token_ref(x, s, z)),
               [("PyTorch twin quantize_per_token_ref (eager)", lambda: quantize_per_token_ref(x, s, z), None)],
               note=f"byte floor {floor:.4f} ms")


@functools.lru_cache(maxsize=None)
def _mamba_ssm():
    """(selective_scan_fn, None) or (None, why it does not import)."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as exc:  # noqa: BLE001  (ImportError, or its CUDA extension failing to load)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return selective_scan_fn, None


def scan_inputs(gen, batch, d, length, n, value=torch.float32, fdtype=torch.float32, rank=48):
    """Vim's two directions as its mixer passes them: u channel-major, delta / z token-major, B / C column
    slices of x_proj's output; int8 u / delta come with per-position scales (K, L)."""
    K = 2
    r = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    if value == torch.int8:
        q = lambda *s: torch.randint(-127, 128, s, dtype=torch.int8, device=DEV, generator=gen)  # noqa: E731
        u = [q(batch, d, length) for _ in range(K)]
        delta = [q(batch, length, d).transpose(1, 2) for _ in range(K)]
        scales = [torch.rand(K, length, device=DEV, generator=gen) * s + 1e-3 for s in (0.02, 0.01)]
    else:
        u = [r(batch, d, length).to(value) for _ in range(K)]
        delta = [(r(batch, length, d) * 0.5 - 1).to(value).transpose(1, 2) for _ in range(K)]
        scales = [None, None]
    x_dbl = [r(batch, length, rank + 2 * n).to(fdtype) for _ in range(K)]
    B = [x[..., rank:rank + n].transpose(1, 2) for x in x_dbl]
    C = [x[..., rank + n:].transpose(1, 2) for x in x_dbl]
    A, D = -torch.exp(r(K, d, n) * 0.5), r(K, d)
    z = r(batch, length, d).to(fdtype).transpose(1, 2)
    return u, delta, A, B, C, D, z, scales


def one_direction_fp16(args):
    """Two fp16 one-direction scans (the backward one on pre-flipped inputs; int8 inputs dequantized first):
    mamba-ssm's ``selective_scan_fn`` where it imports, else vmq's own fp16 scan (multi_scan, K = 1)."""
    u, delta, A, B, C, D, z, scales = args
    if u[0].dtype == torch.int8:
        u, delta = ([x.float() * s[k] for k, x in enumerate(v)] for v, s in zip((u, delta), scales))
    flip = (lambda x: x, lambda x: x.flip(-1))
    dirs = [[flip[k](x).half().contiguous() for x in (u[k], delta[k], B[k], C[k], z)] for k in range(2)]

    def ref():
        return [selective_scan_ref(*[x.float() for x in dk[:2]], A[k], *[x.float() for x in dk[2:4]], D[k],
                                   dk[4].float(), True) for k, dk in enumerate(dirs)]

    scan, why = _mamba_ssm()
    if scan is not None:
        def fn():
            return [scan(dk[0], dk[1], A[k], dk[2], dk[3], D=D[k], z=dk[4], delta_bias=None, delta_softplus=True)
                    for k, dk in enumerate(dirs)]
        label = "2 x mamba-ssm selective_scan_fn fp16 (inputs pre-flipped)"
    else:
        length = u[0].shape[-1]
        one = sequence_orders(length, bidirectional=False).to(DEV)

        def fn():
            return [multi_scan([dk[0]], [dk[1]], A[k:k + 1], [dk[2]], [dk[3]], D[k:k + 1], None, dk[4], None, one,
                               length, True, "sum", backend="cuda") for k, dk in enumerate(dirs)]
        label = f"2 x vmq multi_scan K=1 fp16: vmq's own one-direction scan (mamba-ssm: {why})"
    return label, fn, lambda: next(filter(None, (close(g, w, 2e-2) for g, w in zip(fn(), ref()))), None)


def scan_cases(t: Table, gen) -> None:
    d, length, n = 1536, 197, 16
    orders = sequence_orders(length).to(DEV)
    for batch in BATCHES:
        for value, fdtype, what in ((torch.float32, torch.float32, "fp32"), (torch.int8, torch.float32, "int8 u/delta"),
                                    (torch.float16, torch.float16, "fp16")):
            args = scan_inputs(gen, batch, d, length, n, value, fdtype)
            u, delta, A, B, C, D, z, (us, ds) = args
            kern = lambda: multi_scan(u, delta, A, B, C, D, None, z, orders, orders, length, True, "mean",  # noqa: E731
                                      u_scale=us, delta_scale=ds, backend="cuda")
            ref = lambda: multi_scan_ref(u, delta, A, B, C, D, None, z, orders, orders, us, ds, length, True,  # noqa: E731
                                         "mean")
            baselines = []
            if value == torch.float32:
                bi = lambda: bidirectional_scan(u[0], delta[0], A[0], B[0], C[0], D[0], u[1], delta[1], A[1], B[1],  # noqa: E731
                                                C[1], D[1], z, True, True, backend="cuda")
                baselines.append(("vmq::bidirectional_scan fp32 (the two-direction kernel)", bi,
                                  lambda: close(bi(), ref(), 1e-4)))
            baselines.append(one_direction_fp16(args))
            sv, sf = u[0].element_size(), B[0].element_size()
            floor = ((2 * (2 * sv + 2 * n * sf / d) + sf + 4) * batch * d * length) / HBM_BYTES_PER_S * 1e3
            t.case(f"multi_scan {what} Vim-B b{batch} K=2 (1536, 197, 16)", kern,
                   lambda: close(kern(), ref(), 1e-4 if value != torch.float16 else 1e-3), baselines,
                   note=f"byte floor {floor:.4f} ms")


def training_scan_cases(t: Table, gen) -> None:
    """fwd + bwd of the one-direction training scan at a JLSS shape of Vim-S (batch 64, d_inner 768)."""
    batch, d, length, n = 64, 768, 197, 16
    r = lambda *s: torch.randn(*s, device=DEV, generator=gen)  # noqa: E731
    leaves = [r(batch, d, length), r(batch, d, length) * 0.5 - 1, -torch.exp(r(d, n) * 0.5), r(batch, n, length),
              r(batch, n, length), r(d), r(batch, d, length)]
    leaves = [x.requires_grad_() for x in leaves]
    gy = r(batch, d, length)

    def grads(scan):
        return lambda: torch.autograd.grad(scan(*leaves, True), leaves, gy)

    def agree(scan):
        return lambda: next(filter(None, (close(g, w, 1e-3) for g, w in zip(grads(scan)(), want()))), None)

    want = functools.lru_cache(maxsize=None)(grads(selective_scan_ref))
    ref = ("reference selective_scan_ref (PyTorch loop, autograd)", grads(selective_scan_ref), None)
    mamba, why = _mamba_ssm()
    mamba_row = ("mamba-ssm selective_scan_fn fp32", why or grads(
        lambda u, dl, A, B, C, D, z, sp: mamba(u, dl, A, B, C, D=D, z=z, delta_bias=None, delta_softplus=sp)),
        None if why else agree(lambda u, dl, A, B, C, D, z, sp: mamba(u, dl, A, B, C, D=D, z=z, delta_bias=None,
                                                                     delta_softplus=sp)))
    scan = training_scan(DEV)
    case = f"training scan fwd+bwd Vim-S JLSS b{batch} ({d}, {length}, {n})"
    if scan is selective_scan_ref:
        t.rows.append({"case": case, "status": "missing (training_scan('cuda') is the reference: no CUDA training "
                                                "kernel registered)"})
        t.case(case.replace("training scan", "reference scan"), grads(selective_scan_ref), lambda: None, [mamba_row])
        return
    t.case(case, grads(scan), agree(scan), [ref, mamba_row])


def vq_cases(t: Table, gen) -> None:
    k, n, dim, size = 768, 3072, 4, 256
    for batch in BATCHES:
        m = batch * 197
        x = (torch.randn(m, k, device=DEV, generator=gen)).half()
        codes = torch.randint(0, size, (n, k // dim), dtype=torch.int32, device=DEV, generator=gen)
        cb = torch.randn(1, size, dim, device=DEV, generator=gen).half()
        w16 = vq_dequantize_ref(codes, cb, k).half()
        kern = lambda: vq_linear(x, codes, cb, n, backend="cuda")  # noqa: E731
        t.case(f"VQ GEMM b{batch} in_proj ({m}x{k} @ {k}x{n}, 2 bits: K={size} d={dim})", kern,
               lambda: close(kern(), vq_linear_ref(x.float(), codes, cb, n), 2e-3),
               [("decode + cuBLAS fp16 (decoded every call)", lambda: F.linear(x, vq_dequantize_ref(codes, cb, k).half()),
                 None),
                ("cuBLAS fp16 on the cached decoded weight (ceiling)", lambda: F.linear(x, w16), None)])


def kmeans_cases(t: Table, gen) -> None:
    pts, cents = torch.randn(1 << 20, 4, device=DEV, generator=gen), torch.randn(256, 4, device=DEV, generator=gen)

    def check():
        codes, dist = assign(pts, cents, return_dist=True, backend="cuda")
        ref_codes, ref_dist = assign_ref(pts, cents, chunk=1 << 18, return_dist=True)
        agree = (codes == ref_codes).float().mean().item()
        return close(dist, ref_dist, 1e-4) or (None if agree > 0.99 else f"codes agree on {agree:.1%} only")

    t.case("k-means assign (2^20 points, d 4, K 256)", lambda: assign(pts, cents, backend="cuda"), check,
           [("chunked matmul + argmin (assign_ref, 2^18-point chunks)", lambda: assign_ref(pts, cents, chunk=1 << 18),
             None)])


def run() -> Table:
    torch.backends.cuda.matmul.allow_tf32 = False
    t = Table()
    gen = torch.Generator(device=DEV).manual_seed(0)
    for cases in (gemm_cases, quantize_cases, scan_cases, training_scan_cases, vq_cases, kmeans_cases):
        try:
            cases(t, gen)
        except Exception as exc:  # noqa: BLE001  (one broken group must not hide the others)
            t.rows.append({"case": cases.__name__, "status": f"FAILED: {type(exc).__name__}: {str(exc)[:160]}"})
        torch.cuda.empty_cache()
    return t


def print_rows(t: Table) -> None:
    print(f"\nGPU: {torch.cuda.get_device_name()}, torch {torch.__version__}; timing: {t.label}; "
          "ratio = baseline / kernel (> 1: vmq faster)")
    print(f"{'case':<58} {'kernel ms':>10} {'wall ms':>8} {'base ms':>9} {'ratio':>7}  baseline / note")
    for r in t.rows:
        if "kernel_ms" not in r:
            print(f"{r['case']:<58} {r['status']}")
            continue
        note = r.get("note", "")
        if "ratio" in r:
            note = ("vmq faster" if r["ratio"] > 1 else "baseline faster") + (f"; {note}" if note else "")
        base = f"{r['baseline_ms']:9.4f} {r['ratio']:7.2f}" if "ratio" in r else f"{'-':>9} {'-':>7}"
        tail = r["baseline"] + (f": {r['status']}" if r.get("status") else "") + (f"  [{note}]" if note else "")
        print(f"{r['case']:<58} {r['kernel_ms']:10.4f} {r['wall_ms']:8.4f} {base}  {tail}")
