"""The NVRTC build of the CUDA kernels (vmq.ops.nvrtc) on a GPU, held to the twins (marker ``gpu``).

The bindings are called directly, so these run whichever path serves ``torch.ops.vmq`` (vmq._C's
kernels, or NVRTC's); where vmq._C has CUDA kernels too, both are compared. A subprocess checks
the registered path (``VMQ_CUDA_KERNELS=nvrtc``). Tolerances are tests/test_kernels_gpu.py's:
the integer kernels are bit-identical to their twins.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.test_kernels import _linear_inputs, _multi_scan_inputs, _scan_inputs, _vq_inputs
from tests.test_kernels_gpu import VQ_CASES, _bf16, _vq_check, bidirectional_quantized_inputs
from tests.test_scan_train_cuda import EMPTY as TRAIN_EMPTY
from tests.test_scan_train_cuda import NAMES as TRAIN_NAMES
from tests.test_scan_train_cuda import SHAPES as TRAIN_SHAPES
from tests.test_scan_train_cuda import _close, _inputs, _poison
from vmq.models.scan_orders import stack_orders
from vmq.ops import _library, nvrtc
from vmq.ops.kmeans import assign_ref
from vmq.ops.linear import int8_linear_ref, pack_int4, vq_linear_ref, w4a8_linear_ref
from vmq.ops.multi_scan import multi_scan_ref
from vmq.ops.nvrtc import gemm as G
from vmq.ops.nvrtc import scan as S
from vmq.ops.nvrtc import scan_train as T
from vmq.ops.quantize import quantize_per_token_ref
from vmq.ops.scan import bidirectional_scan_ref
from vmq.ops.scan_train import scan_train_bwd_ref, scan_train_fwd_ref

ROOT = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="CuPy is not installed")]


@pytest.fixture(autouse=True, scope="module")
def _nvrtc_available():
    why = nvrtc.unavailable()
    if why is not None:
        pytest.skip(f"NVRTC cannot build the kernels here: {why}")


def cu(ts):
    return [t.cuda() if isinstance(t, torch.Tensor) else cu(t) if isinstance(t, list) else t for t in ts]


@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 7, 3), (3, 65, 96, 384), (1, 7, 33, 17), (2, 197, 384, 1536),
                                   (2, 3, 0, 4)])
@pytest.mark.parametrize("per_row", [False, True])
def test_int_linear_is_bit_identical(shape, per_row):
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(*shape, per_row=per_row)
    out = G.int8_linear(*cu((x_q, xs, zp, w, ws, bias)), None, None, 8)
    assert torch.equal(out.cpu(), int8_linear_ref(x_q, xs, zp, w, ws, bias))
    for bits in (8, 4):
        out = G.int8_linear(*cu((x_q, xs, zp, w, ws, bias, os_, oz % (1 << bits))), bits)
        assert torch.equal(out.cpu(), int8_linear_ref(x_q, xs, zp, w, ws, bias, os_, oz % (1 << bits), bits))
    if shape[2] % 2 == 0:
        packed = pack_int4(torch.clamp(w, -8, 7))
        out = G.w4a8_linear(*cu((x_q, xs, zp, packed, ws, bias)), None, None, 8)
        assert torch.equal(out.cpu(), w4a8_linear_ref(x_q, xs, zp, packed, ws, bias))


@pytest.mark.parametrize("shape", [(64, 197, 96), (1, 70001, 520), (3, 30001, 7), (2, 3, 5000),
                                   (1, 1, 65535 * 1024 + 5)])
def test_quantize_per_token_is_bit_identical(shape):
    """Rows on grid x (1 to 256 threads each), chunks of columns on grid y (5 of 1024 for 5000
    columns; 65536 for the last shape's row, looping past 65535); the float4 path and the scalar one."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(*shape, generator=g) * 4
    for per_row in (False, True) if x.numel() < 1 << 24 else (False,):
        pshape = shape[:-1] if per_row else shape[-2:-1]
        scale = torch.rand(pshape, generator=g) * 0.05 + 0.01
        zp = torch.randint(0, 256, pshape, dtype=torch.int32, generator=g)
        x.view(-1, shape[-1])[0, :8] = (torch.arange(8)[:shape[-1]] + 0.5) * scale.view(-1)[0]  # halves round to even
        for bits in (8, 4):
            out = G.quantize_per_token(*cu((x, scale, zp % (1 << bits))), bits)
            assert torch.equal(out.cpu(), quantize_per_token_ref(x, scale, zp % (1 << bits), bits)), (per_row, bits)
    if shape[-1] % 4 == 0:  # 4 bytes past a 16-byte boundary: the scalar path
        flat = torch.zeros(x.numel() + 1, device="cuda")
        flat[1:] = x.reshape(-1).cuda()
        out = G.quantize_per_token(flat[1:].view(shape), *cu((scale, zp)), 8)
        assert torch.equal(out.cpu(), quantize_per_token_ref(x, scale, zp, 8))


@pytest.mark.parametrize("shape", [(2, 19, 13, 16), (1, 8, 1, 16), (3, 200, 197, 16), (1, 24, 40, 48)])
@pytest.mark.parametrize("token_major", [False, True])
def test_bidirectional_scan_matches_twin(shape, token_major):
    args = _scan_inputs(*shape, token_major=token_major)
    ref = bidirectional_scan_ref(*args, None, None, None, None, True, True)
    out = S.bidirectional_scan(*cu(args), None, None, None, None, True, True)
    assert out.stride(1) == 1
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-4, atol=2e-4)


def test_bidirectional_scan_int8_and_fp16_inputs():
    qargs, s, half = bidirectional_quantized_inputs()
    out = S.bidirectional_scan(*cu(qargs), *cu(s), True, True)
    torch.testing.assert_close(out.cpu(), bidirectional_scan_ref(*qargs, *s, True, True), rtol=2e-4, atol=2e-4)
    ref = bidirectional_scan_ref(*[t.float() if t is not None else t for t in half], *[None] * 4, True, True)
    torch.testing.assert_close(S.bidirectional_scan(*cu(half), None, None, None, None, True, True).cpu(), ref,
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["vim", "cross", "local", "scan_order"])
@pytest.mark.parametrize("merge", ["sum", "mean", "none"])
@pytest.mark.parametrize("shape", [(2, 19, 5), (3, 200, 16), (1, 40, 1), (2, 24, 48)])
def test_multi_scan_matches_twin(case, merge, shape):
    args = _multi_scan_inputs(case, *shape, layout="mixed", shared_u=True, merge=merge)
    out = S.multi_scan(*cu(args))
    assert out.transpose(-1, -2).is_contiguous()
    torch.testing.assert_close(out.cpu(), multi_scan_ref(*args), rtol=2e-4, atol=2e-4)


def test_multi_scan_int8_fp16_and_more_directions_than_one_launch():
    args = _multi_scan_inputs("local", 2, 64, 16, seed=3, layout="mixed", shared_u=True, int8=("u", "delta"),
                              merge="mean")
    torch.testing.assert_close(S.multi_scan(*cu(args)).cpu(), multi_scan_ref(*args), rtol=2e-4, atol=2e-4)
    args = _multi_scan_inputs("local", 2, 64, 16, seed=4, layout="mixed", shared_u=True, merge="none")
    for i in (0, 1, 3, 4):
        args[i] = [x.half() for x in args[i]]
    args[7] = args[7].half()
    ref = multi_scan_ref(*[[x.float() for x in a] if isinstance(a, list) else a for a in args[:7]], args[7].float(),
                         *args[8:])
    torch.testing.assert_close(S.multi_scan(*cu(args)).cpu(), ref, rtol=1e-3, atol=1e-3)
    g = torch.Generator().manual_seed(7)  # 10 directions: two launches
    orders = [torch.randperm(20, generator=g)[:12 + k] for k in range(10)]
    out_index = stack_orders(orders)
    base = _multi_scan_inputs("cross", 2, 33, 16, seed=5, layout="mixed", merge="sum")
    pad = lambda x: torch.cat([x, x[..., :5]], -1)  # noqa: E731  (20 positions)
    u, delta, B, C = (pad(base[i][0]) for i in (0, 1, 3, 4))
    args = [[u] * 10, [delta] * 10, -torch.exp(torch.randn(10, 33, 16, generator=g) * 0.5), [B] * 10, [C] * 10, None,
            torch.randn(10, 33, generator=g), None, torch.where(out_index >= 0, (out_index * 7) % 20, -1), out_index,
            None, None, 20, True, "sum"]
    torch.testing.assert_close(S.multi_scan(*cu(args)).cpu(), multi_scan_ref(*args), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("case", VQ_CASES)
def test_vq_linear_matches_twin(case):
    """fp32 x on bfloat16 operands (vq_gemm_kernel<true>), fp16 x on fp16 ones (<false>): the twin
    on the operands the tensor cores take, to fp32 rounding (tests/test_kernels_gpu.py's bound)."""
    x, codes, cb, rpg, s, bias = _vq_inputs(*case)
    out = G.vq_linear(*cu((x, codes, cb)), rpg, *cu((s, bias)))
    _vq_check(out, vq_linear_ref(_bf16(x), codes, _bf16(cb.float()), rpg, s, bias), x, codes, cb, rpg, s, 1e-4)
    out = G.vq_linear(*cu((x.half(), codes, cb)), rpg, None, None)
    _vq_check(out, vq_linear_ref(x.half().float(), codes, cb, rpg), x, codes, cb, rpg, None, 1e-4)


def test_int_linear_with_a_cached_w_sum_is_bit_identical():
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(2, 65, 96, 200, seed=4)
    w_sum = w.sum(1, dtype=torch.int32)
    for tail in ((None, None, 8), (os_, oz, 8), (os_, oz % 16, 4)):
        out = G.int8_linear(*cu((x_q, xs, zp, w, ws, bias, *tail, w_sum)))
        assert torch.equal(out.cpu(), int8_linear_ref(x_q, xs, zp, w, ws, bias, *tail))
    w4 = torch.clamp(w, -8, 7)
    out = G.w4a8_linear(*cu((x_q, xs, zp, pack_int4(w4), ws, bias)), None, None, 8, w4.sum(1, dtype=torch.int32).cuda())
    assert torch.equal(out.cpu(), int8_linear_ref(x_q, xs, zp, w4, ws, bias))
    out = G.int8_linear(*cu((x_q, xs, zp, w, ws, bias)), None, None, 8, (w_sum + 1).cuda())  # the given sums are used
    assert not torch.equal(out.cpu(), int8_linear_ref(x_q, xs, zp, w, ws, bias))
    with pytest.raises(RuntimeError, match="int8_linear: w_sum must be on cuda"):
        G.int8_linear(*cu((x_q, xs, zp, w, ws, bias)), None, None, 8, w_sum)


def test_gemms_loop_past_65535_blocks_of_output_channels():
    n, k = 65535 * 64 + 65, 16  # 65537 blocks of 64 channels; grid.y holds 65535, the blocks loop
    g = torch.Generator().manual_seed(11)
    x_q, xs, zp, _, _, _, _, _ = _linear_inputs(1, 3, k, 1, seed=11)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    ws, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    out = G.int8_linear(*cu((x_q, xs, zp, w, ws, bias)), None, None, 8)
    assert torch.equal(out.cpu(), int8_linear_ref(x_q, xs, zp, w, ws, bias))
    codes = torch.randint(0, 16, (n, k // 4), dtype=torch.int32, generator=g)
    cb, x = torch.randn(1, 16, 4, generator=g).half(), torch.randn(1, 3, k, generator=g)
    out = G.vq_linear(*cu((x, codes, cb)), n, None, None)
    _vq_check(out, vq_linear_ref(_bf16(x), codes, _bf16(cb.float()), n), x, codes, cb, n, None, 1e-4)


@pytest.mark.parametrize("shape", TRAIN_SHAPES + TRAIN_EMPTY, ids=lambda s: "x".join(map(str, s)))
def test_scan_train_matches_twins(shape):
    """The forward and its five gradients, on outputs allocated over NaN, to tests/test_scan_train_cuda.py's
    bounds; empty shapes as the CPU kernel (empty outputs, zero gradients of A, B, C where those are not empty)."""
    args, gy = _inputs(*shape)
    if 0 in shape:
        host = [t.cpu() for t in args]
        want = [torch.ops.vmq.scan_train_fwd(*host), *torch.ops.vmq.scan_train_bwd(*host, gy.cpu())]
        got = [T.scan_train_fwd(*args), *T.scan_train_bwd(*args, gy)]
        assert all(g.is_cuda and torch.equal(g.cpu(), w) for g, w in zip(got, want))
        return
    _poison(args[0])
    _close(T.scan_train_fwd(*args), scan_train_fwd_ref(*args), "y")
    _poison(*args, *args)
    for name, got, want in zip(TRAIN_NAMES, T.scan_train_bwd(*args, gy.transpose(1, 2).contiguous().transpose(1, 2)),
                               scan_train_bwd_ref(*args, gy)):
        _close(got, want, f"grad {name}")


@pytest.mark.parametrize("n,k,d", [(1000, 16, 4), (777, 5, 1), (2000, 64, 32)])
def test_kmeans_assign_finds_a_nearest_centroid(n, k, d):
    g = torch.Generator().manual_seed(0)
    x, c, w = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g), torch.rand(d, generator=g)
    codes, dist = G.kmeans_assign(x.cuda(), w.cuda().expand(n, d), c.cuda())
    ref_codes, ref_dist = assign_ref(x.double(), c.double(), w.double(), return_dist=True)
    torch.testing.assert_close(dist.cpu().double(), ref_dist, rtol=1e-4, atol=1e-4)
    assert (codes.cpu() == ref_codes).float().mean() > 0.99


def test_bad_inputs_raise_the_bindings_errors():
    x_q, xs, zp, w, ws, bias, _, _ = cu(_linear_inputs(2, 5, 32, 16))
    with pytest.raises(RuntimeError, match="int8_linear: w_q must be on cuda"):
        G.int8_linear(x_q, xs, zp, w.cpu(), ws, bias, None, None, 8)
    with pytest.raises(RuntimeError, match="65535 samples"):
        S.bidirectional_scan(*cu(_scan_inputs(65536, 1, 1, 1)), None, None, None, None, True, True)
    x, codes, cb, rpg, s, b = cu(_vq_inputs(5, 16, 8, 4, 16, 8))
    good = G.vq_linear(x, codes, cb, rpg, s, b)
    bad = codes.clone()
    bad[3, 1], bad[5, 0] = cb.shape[1], -1  # not checked per call: an out-of-range code reads as NaN
    out = G.vq_linear(x, bad, cb, rpg, s, b)
    keep = [i for i in range(8) if i not in (3, 5)]
    assert out[..., [3, 5]].isnan().all() and torch.equal(out[..., keep], good[..., keep])


@pytest.mark.skipif(_library.NATIVE is None or not _library.NATIVE.cuda_built, reason="vmq._C has no CUDA kernels")
def test_nvrtc_kernels_equal_the_compiled_ones():
    """Same sources, same flags: the integer kernels agree bit for bit (their epilogues round each
    step explicitly), the scans and the VQ GEMM to rounding (the compilers may contract differently)."""
    native = torch.ops.vmq  # vmq._C's kernels unless VMQ_CUDA_KERNELS=nvrtc put NVRTC's there
    lin = cu(_linear_inputs(2, 197, 384, 1536, seed=2))
    assert torch.equal(G.int8_linear(*lin[:6], None, None, 8), native.int8_linear(*lin[:6], None, None, 8))
    w_sum = lin[3].sum(1, dtype=torch.int32)
    assert torch.equal(G.int8_linear(*lin, 6, w_sum), native.int8_linear(*lin, 6, w_sum))
    x, s = torch.randn(2, 70001, 12, device="cuda"), torch.rand(70001, device="cuda") + 0.01
    z = lin[2][:1].repeat(70001)
    assert torch.equal(G.quantize_per_token(x, s, z, 8), native.quantize_per_token(x, s, z, 8))
    vq = cu(_vq_inputs(65, 192, 384, 8, 256, 384, seed=2))
    for x in (vq[0], vq[0].half()):
        torch.testing.assert_close(G.vq_linear(x, *vq[1:]), native.vq_linear(x, *vq[1:]), rtol=1e-5, atol=1e-5)
    args = cu(_scan_inputs(2, 192, 197, 16, seed=2)) + [None] * 4 + [True, True]
    torch.testing.assert_close(S.bidirectional_scan(*args), native.bidirectional_scan(*args), rtol=1e-6, atol=1e-6)
    args, gy = _inputs(2, 130, 197, 17, seed=2)  # (dB, dC: sums by atomics, in no fixed order)
    torch.testing.assert_close(T.scan_train_fwd(*args), native.scan_train_fwd(*args), rtol=1e-6, atol=1e-6)
    for got, want in zip(T.scan_train_bwd(*args, gy), native.scan_train_bwd(*args, gy)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_launches_go_to_the_current_stream_and_into_cuda_graphs():
    x_q, xs, zp, w, ws, bias, _, _ = _linear_inputs(2, 197, 384, 1536, seed=9)
    ref = int8_linear_ref(x_q, xs, zp, w, ws, bias)
    src, rest = x_q.cuda(), cu((xs, zp, w, ws, bias))
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        a = torch.randn(4096, 4096, device="cuda")
        for _ in range(4):  # work queued on the side stream before the input exists
            a = a @ a / 100
        out = G.int8_linear(src + 0, *rest, None, None, 8)
    side.synchronize()
    assert torch.equal(out.cpu(), ref)
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (loads the module) outside the capture
        G.int8_linear(src, *rest, None, None, 8)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = G.int8_linear(src, *rest, None, None, 8)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out.cpu(), ref)


def test_vmq_cuda_kernels_nvrtc_registers_them():
    """VMQ_CUDA_KERNELS=nvrtc: the path is NVRTC, every CUDA-kernel op has it, and the op runs it."""
    code = ("import torch\nfrom vmq.env import kernels\nfrom vmq.ops import _library, nvrtc\n"
            "from tests.test_kernels import _linear_inputs\nfrom vmq.ops.linear import int8_linear_ref\n"
            "assert _library.CUDA_KERNELS.path == 'nvrtc', _library.CUDA_KERNELS\n"
            "assert kernels()['cuda_kernels'].startswith('nvrtc (CuPy ')\n"
            "assert all(_library.has_kernel(op, 'cuda') for op in nvrtc.IMPLS)\n"
            "t = _linear_inputs(2, 5, 32, 16)[:6]\n"
            "out = torch.ops.vmq.int8_linear(*[a.cuda() for a in t], None, None, 8)\n"
            "assert torch.equal(out.cpu(), int8_linear_ref(*t))\nprint('ok')\n")
    env = {**os.environ, "VMQ_CUDA_KERNELS": "nvrtc"}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
