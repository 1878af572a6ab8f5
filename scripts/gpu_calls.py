"""Each CUDA kernel variant of vmq._C called once, for compute-sanitizer and profilers (no checks).

    python3 scripts/gpu_calls.py --small    # tail shapes: partial tiles, odd sizes, misaligned inputs
    python3 scripts/gpu_calls.py            # Vim-B shapes at batch 64, one call each (for ncu)

Run under ``compute-sanitizer --tool memcheck`` with ``PYTORCH_NO_CUDA_MEMORY_CACHING=1`` (every
tensor its own allocation, so that a read or write past a tensor's end is an error) and under
``--tool racecheck``. Variants: int8 / W4A8 GEMM (float and requantized output, per-token and
per-row parameters, vector and byte paths), quantize_per_token, the K-direction scan (fp32, fp16,
int8 u / delta with fp32 or fp16 B / C; d_state 1, 16, 17, 64; with and without in_index, padding
steps, merge none; no D / z / softplus), the bidirectional scan, the VQ GEMM, k-means assignment,
and the training scan's forward / backward where a CUDA kernel is registered.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from vmq.models.scan_orders import cross_orders, direction_order, sequence_orders, stack_orders  # noqa: E402
from vmq.ops import _library  # noqa: E402
from vmq.ops.linear import pack_int4  # noqa: E402

V = torch.ops.vmq
DEV = "cuda"


def misaligned(t: torch.Tensor) -> torch.Tensor:
    """The same values in a contiguous view one element past an aligned address (no vector loads)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def linear_calls(batch, tokens, k, n, per_row=False):
    g = torch.Generator(device=DEV).manual_seed(k * 131 + n)
    pshape = (batch, tokens) if per_row else (tokens,)
    x = torch.randint(0, 256, (batch, tokens, k), dtype=torch.uint8, device=DEV, generator=g)
    xs = torch.rand(pshape, device=DEV, generator=g) * 0.1 + 1e-3
    zp = torch.randint(0, 256, pshape, dtype=torch.int32, device=DEV, generator=g)
    w = torch.randint(-8, 8, (n, k), dtype=torch.int8, device=DEV, generator=g)
    ws, bias = torch.rand(n, device=DEV, generator=g) * 0.01, torch.randn(n, device=DEV, generator=g)
    os_, oz = torch.rand(pshape, device=DEV, generator=g) + 0.05, torch.randint(0, 16, pshape, dtype=torch.int32,
                                                                                device=DEV, generator=g)
    for xx, ww in ((x, w), (misaligned(x), misaligned(w))):
        V.int8_linear(xx, xs, zp, ww, ws, bias, None, None, 8)
        V.int8_linear(xx, xs, zp, ww, ws, None, os_, oz, 4)
        if k % 2 == 0:
            packed = pack_int4(ww)
            for pk in (packed, misaligned(packed)):
                V.w4a8_linear(xx, xs, zp, pk, ws, bias, None, None, 8)
                V.w4a8_linear(xx, xs, zp, pk, ws, None, os_, oz, 4)
    xf = torch.randn(batch, tokens, max(k, 1), device=DEV, generator=g)
    V.quantize_per_token(xf, xs, zp, 8)
    V.quantize_per_token(misaligned(xf), xs, zp % 16, 4)
    if k and _library.has_kernel("int8_linear_from_float", "cuda"):
        V.int8_linear_from_float(xf[..., :k], None, xs, zp, 8, w, ws, bias)


def scan_calls(batch, d, n, orders, in_order, seqlen, dtypes, merge="mean", options=True):
    """multi_scan on ``orders`` (K, S); u channel-major, delta / B / C / z token-major (as the mixers pass them)."""
    g = torch.Generator(device=DEV).manual_seed(d * 7 + n)
    orders = orders.to(DEV)
    K, S = orders.shape
    positions = S if in_order else seqlen
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    value, fdtype = dtypes
    if value == torch.int8:
        q = lambda: torch.randint(-127, 128, (batch, positions, d), dtype=torch.int8, device=DEV,  # noqa: E731
                                  generator=g).transpose(1, 2)
        u = [q().contiguous() for _ in range(K)]
        delta = [q() for _ in range(K)]
        scales = [torch.rand(K, positions, device=DEV, generator=g) * 0.02 + 1e-3 for _ in range(2)]
    else:
        u = [r(batch, d, positions).to(value) for _ in range(K)]
        delta = [(r(batch, positions, d) * 0.5 - 1).to(value).transpose(1, 2) for _ in range(K)]
        scales = [None, None]
    A = -torch.exp(r(K, d, n) * 0.5)
    B = [r(batch, positions, n).to(fdtype).transpose(1, 2) for _ in range(K)]
    C = [r(batch, positions, n).to(fdtype).transpose(1, 2) for _ in range(K)]
    z = r(batch, seqlen, d).to(fdtype).transpose(1, 2)
    idx = None if in_order else orders
    V.multi_scan(u, delta, A, B, C, r(K, d), r(K, d) * 0.5, z, idx, orders, *scales, seqlen, True, merge)
    if options:  # no D, delta_bias, z or softplus; each direction apart
        delta = [x.abs() if x.dtype != torch.int8 else x for x in delta]
        V.multi_scan(u, delta, A, B, C, None, None, None, idx, orders, *scales, seqlen, False, "none")


def bidirectional_calls(batch, d, length, n):
    g = torch.Generator(device=DEV).manual_seed(d + length)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    args = []
    for _ in range(2):
        args += [r(batch, d, length), r(batch, d, length) * 0.5 - 1, -torch.exp(r(d, n) * 0.5), r(batch, n, length),
                 r(batch, n, length), r(d)]
    args.append(r(batch, d, length))
    V.bidirectional_scan(*args, None, None, None, None, True, True)
    half = [t.half() if i in (0, 1, 3, 4, 6, 7, 9, 10, 12) else t for i, t in enumerate(args)]
    V.bidirectional_scan(*half, None, None, None, None, True, False)


def vq_calls(tokens, k, n, dim, size, rows_per_group):
    g = torch.Generator(device=DEV).manual_seed(k + n)
    cols, groups = -(-k // dim), -(-n // rows_per_group)
    x = torch.randn(2, tokens, k, device=DEV, generator=g)
    codes = torch.randint(0, size, (n, cols), dtype=torch.int32, device=DEV, generator=g)
    cb = torch.randn(groups, size, dim, device=DEV, generator=g).half()
    s = (torch.rand(n, device=DEV, generator=g) + 0.5).half()
    V.vq_linear(x, codes, cb, rows_per_group, s, torch.randn(n, device=DEV, generator=g))
    V.vq_linear(misaligned(x.half()), codes, cb, rows_per_group, None, None)


def train_scan_calls(batch, d, length, n):
    if not (_library.has_kernel("scan_train_fwd", "cuda") and _library.has_kernel("scan_train_bwd", "cuda")):
        print("scan_train_fwd / bwd: no CUDA kernel registered, not called")
        return
    g = torch.Generator(device=DEV).manual_seed(d)
    r = lambda *s: torch.randn(*s, device=DEV, generator=g)  # noqa: E731
    u, delta = r(batch, d, length), torch.rand(batch, d, length, device=DEV, generator=g)
    A, B, C = -torch.exp(r(d, n) * 0.5), r(batch, length, n), r(batch, length, n)
    V.scan_train_fwd(u, delta, A, B, C)
    V.scan_train_bwd(u, delta, A, B, C, r(batch, d, length))


def small() -> None:
    for shape in ((1, 1, 1, 1), (2, 5, 7, 3), (3, 65, 96, 70), (1, 13, 48, 38), (2, 9, 6, 130)):
        linear_calls(*shape)
    linear_calls(2, 33, 64, 72, per_row=True)
    f32, f16, i8 = torch.float32, torch.float16, torch.int8
    vim = sequence_orders(37)
    local = stack_orders([direction_order("w2", 3, 5), direction_order("w2_flip", 3, 5), direction_order("v", 3, 5),
                          torch.arange(4).flip(0)])
    for dtypes in ((f32, f32), (f16, f16), (i8, f32), (i8, f16)):
        for n in (1, 16, 17, 64):
            scan_calls(2, 130, n, vim, False, 37, dtypes, options=n == 16)
        scan_calls(2, 40, 16, local, False, 15, dtypes, merge="none")
        scan_calls(1, 24, 16, local, True, 15, dtypes, merge="sum")
    ten = stack_orders([torch.randperm(20)[:12 + k] for k in range(10)])  # two launches (8 directions per launch)
    scan_calls(2, 33, 16, ten, False, 20, (f32, f32))
    scan_calls(1, 64, 1, cross_orders(5, 7), False, 35, (f32, f32), merge="sum")
    for shape in ((2, 130, 70, 16), (1, 24, 40, 48)):
        bidirectional_calls(shape[0], shape[1], shape[2], shape[3])
    vq_calls(7, 30, 13, 4, 4, 5)
    vq_calls(33, 64, 70, 1, 16, 70)
    vq_calls(5, 31, 9, 3, 8, 4)
    for n, k, dim in ((777, 5, 1), (300, 300, 32), (1000, 16, 12)):
        x = torch.randn(n, dim, device=DEV)
        V.kmeans_assign(x, None, torch.randn(k, dim, device=DEV))
        V.kmeans_assign(x, torch.rand(n, dim, device=DEV), torch.randn(k, dim, device=DEV))
    train_scan_calls(2, 40, 37, 16)


def full() -> None:
    for k, n in ((768, 3072), (1536, 80), (48, 1536), (1536, 768)):
        linear_calls(64, 197, k, n)
    scan_calls(64, 1536, 16, sequence_orders(197), False, 197, (torch.float32, torch.float32), options=False)
    scan_calls(64, 1536, 16, sequence_orders(197), False, 197, (torch.int8, torch.float32), options=False)
    vq_calls(64 * 197 // 2, 768, 3072, 4, 256, 3072)
    V.kmeans_assign(torch.randn(1 << 20, 4, device=DEV), None, torch.randn(256, 4, device=DEV))
    train_scan_calls(64, 768, 197, 16)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("gpu_calls.py needs a CUDA device")
    if _library.NATIVE is None or not _library.NATIVE.cuda_built:
        sys.exit(f"vmq._C has no CUDA kernels ({_library.NATIVE_ERROR or 'built without CUDA'})")
    small() if "--small" in sys.argv[1:] else full()
    torch.cuda.synchronize()
    print("gpu_calls: done")
