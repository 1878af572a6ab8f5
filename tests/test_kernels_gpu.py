"""CUDA kernels of vmq._C held to their PyTorch twins (marker ``gpu``: skipped without a CUDA device).

The integer kernels (int8_linear, w4a8_linear, quantize_per_token) must be bit-identical to the
twins, like their CPU counterparts; the scans equal their twins to about 1e-5 relative (they use
the fast exponential; fp16 inputs to fp16 rounding); the VQ GEMM equals its twin on the operands
its tensor cores take (fp16 x and codewords as they are; fp32 x and the codewords rounded to
bfloat16) to fp32 rounding; the k-means assignment finds a nearest centroid.

The same tests on the NVRTC build of the kernels (vmq.ops.nvrtc, through CuPy), which then
override vmq._C's: ``VMQ_CUDA_KERNELS=nvrtc pytest -m gpu tests/test_kernels_gpu.py`` (the
header line ``CUDA kernels:`` says which path ran).
"""

import pytest
import timm
import torch

import vmq.models  # noqa: F401
from tests.test_kernels import (_conv_inputs, _linear_inputs, _mixed_kind_calls, _multi_scan_inputs, _run_multi_scan,
                                _scan_inputs, _vq_inputs)
from vmq.ops import _library
from vmq.ops.backend import use_backend
from vmq.ops.conv import bidirectional_conv1d_silu, bidirectional_conv1d_silu_ref
from vmq.ops.kmeans import assign, assign_ref, update_centroids, update_centroids_ref
from vmq.models.scan_orders import stack_orders
from vmq.layers import QuantizedLinear
from vmq.ops.linear import (int8_linear, int8_linear_ref, pack_int4, vq_dequantize_ref, vq_linear, vq_linear_ref,
                            w4a8_linear, w4a8_linear_ref)
from vmq.ops.norm import rms_norm, rms_norm_ref
from vmq.ops.multi_scan import multi_scan_ref
from vmq.ops.quantize import quantize_per_token, quantize_per_token_ref
from vmq.ops.scan import bidirectional_scan, bidirectional_scan_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_library.CUDA_KERNELS.path == "none",
                                 reason=f"no CUDA kernels: {_library.CUDA_KERNELS.describe()}")]


def cuda(ts):
    return [t.cuda() if isinstance(t, torch.Tensor) else cuda(t) if isinstance(t, list) else t for t in ts]


SHAPES = [(1, 1, 1, 1), (2, 5, 7, 3), (3, 65, 96, 384), (1, 13, 192, 38), (2, 9, 6, 192), (1, 7, 33, 17),
          (2, 197, 384, 1536), (64, 197, 768, 3072), (2, 3, 0, 4)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("per_row", [False, True])
def test_int8_linear_cuda_is_bit_identical(shape, per_row):
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(*shape, per_row=per_row)
    ref = int8_linear_ref(x_q, xs, zp, w, ws, bias)
    out = int8_linear(*cuda((x_q, xs, zp, w, ws, bias)), backend="cuda")
    assert out.is_cuda and torch.equal(out.cpu(), ref)
    for bits in (8, 4):
        ref = int8_linear_ref(x_q, xs, zp, w, ws, bias, os_, oz % (1 << bits), bits)
        out = int8_linear(*cuda((x_q, xs, zp, w, ws, bias, os_, oz % (1 << bits))), bits, backend="cuda")
        assert out.dtype == torch.uint8 and torch.equal(out.cpu(), ref)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[2] % 2 == 0])
def test_w4a8_linear_cuda_is_bit_identical(shape):
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(*shape)
    packed = pack_int4(torch.clamp(w, -8, 7))
    ref = w4a8_linear_ref(x_q, xs, zp, packed, ws, bias)
    assert torch.equal(w4a8_linear(*cuda((x_q, xs, zp, packed, ws, bias)), backend="cuda").cpu(), ref)
    ref = w4a8_linear_ref(x_q, xs, zp, packed, ws, None, os_, oz, 8)
    assert torch.equal(w4a8_linear(*cuda((x_q, xs, zp, packed, ws, None, os_, oz)), 8, backend="cuda").cpu(), ref)


def test_int8_linear_cuda_worst_case_sums():
    k, n = 4096, 64
    x_q = torch.full((1, 4, k), 255, dtype=torch.uint8)
    w = torch.full((n, k), -128, dtype=torch.int8)
    args = (x_q, torch.ones(4), torch.zeros(4, dtype=torch.int32), w, torch.ones(n))
    assert torch.equal(int8_linear(*cuda(args), backend="cuda").cpu(), torch.full((1, 4, n), -255.0 * 128 * k))


def test_quantize_per_token_cuda_is_bit_identical():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 10, 37, generator=g) * 4
    scale = torch.rand(10, generator=g) * 0.05 + 0.01
    zp = torch.randint(0, 256, (10,), dtype=torch.int32, generator=g)
    x[0, 0, :8] = (torch.arange(8) + 0.5) * scale[0]  # exact halves round to even
    for bits in (8, 6, 4):
        out = quantize_per_token(*cuda((x, scale, zp % (1 << bits))), bits, backend="cuda")
        assert torch.equal(out.cpu(), quantize_per_token_ref(x, scale, zp % (1 << bits), bits))


@pytest.mark.parametrize("shape", [(2, 19, 13, 16), (2, 16, 7, 5), (1, 8, 1, 16), (3, 200, 197, 16), (1, 24, 40, 48)])
@pytest.mark.parametrize("token_major", [False, True])
def test_bidirectional_scan_cuda_matches_twin(shape, token_major):
    args = _scan_inputs(*shape, token_major=token_major)
    ref = bidirectional_scan_ref(*args, None, None, None, None, True, True)
    out = bidirectional_scan(*cuda(args), delta_softplus=True, divide_out=True, backend="cuda")
    assert out.stride(1) == 1  # token-major storage
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-4, atol=2e-4)


def bidirectional_quantized_inputs():
    """The bidirectional scan's inputs at (2, 64, 33, 16) twice: with int8 u / delta and their
    per-token scales (args, scales), and with fp16 u, delta, B, C, z (args)."""
    b, d, l, n = 2, 64, 33, 16
    args = _scan_inputs(b, d, l, n, seed=3)
    g = torch.Generator().manual_seed(1)
    q = [torch.randint(-127, 128, (b, d, l), dtype=torch.int8, generator=g) for _ in range(4)]
    s = [torch.rand(l, generator=g) * 0.02 + 1e-3 for _ in range(4)]
    qargs = list(args)
    qargs[0], qargs[1], qargs[6], qargs[7] = q
    half = [t.half() if t is not None and i in (0, 1, 3, 4, 6, 7, 9, 10, 12) else t for i, t in enumerate(args)]
    return qargs, s, half


def test_bidirectional_scan_cuda_int8_and_fp16_inputs():
    qargs, s, half = bidirectional_quantized_inputs()
    ref = bidirectional_scan_ref(*qargs, *s, True, True)
    out = bidirectional_scan(*cuda(qargs), True, True, *cuda(s), backend="cuda")
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-4, atol=2e-4)
    ref = bidirectional_scan_ref(*[t.float() if t is not None else t for t in half], *[None] * 4, True, True)
    out = bidirectional_scan(*cuda(half), True, True, backend="cuda")
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case", ["vim", "cross", "local", "scan_order"])
@pytest.mark.parametrize("merge", ["sum", "mean", "none"])
@pytest.mark.parametrize("layout", ["token", "channel", "mixed"])
@pytest.mark.parametrize("shape", [(2, 19, 5), (3, 200, 16), (1, 40, 1), (2, 24, 48)])
def test_multi_scan_cuda_matches_twin(case, merge, layout, shape):
    args = _multi_scan_inputs(case, *shape, layout=layout, shared_u=layout != "token", merge=merge)
    ref = multi_scan_ref(*args)
    out = _run_multi_scan(cuda(args), "cuda")
    assert out.is_cuda and out.shape == ref.shape and out.transpose(-1, -2).is_contiguous()
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("case", ["vim", "local", "scan_order"])
@pytest.mark.parametrize("merge", ["mean", "none"])
def test_multi_scan_cuda_int8_and_fp16_inputs(case, merge):
    args = _multi_scan_inputs(case, 2, 64, 16, seed=3, layout="mixed", shared_u=True, int8=("u", "delta"),
                              merge=merge)
    torch.testing.assert_close(_run_multi_scan(cuda(args), "cuda").cpu(), multi_scan_ref(*args), rtol=2e-4, atol=2e-4)
    args = _multi_scan_inputs(case, 2, 64, 16, seed=4, layout="mixed", shared_u=True, merge=merge)
    for i in (0, 1, 3, 4):  # u, delta, B, C
        args[i] = [x.half() for x in args[i]]
    args[7] = args[7].half()  # z
    ref = multi_scan_ref(*[[x.float() for x in a] if isinstance(a, list) else a for a in args[:7]], args[7].float(),
                         *args[8:])
    torch.testing.assert_close(_run_multi_scan(cuda(args), "cuda").cpu(), ref, rtol=1e-3, atol=1e-3)


def test_multi_scan_cuda_more_directions_than_one_launch_takes():
    """10 directions (8 go to one launch), orders of mixed lengths with padding, no gate / D."""
    g = torch.Generator().manual_seed(7)
    orders = [torch.randperm(20, generator=g)[:12 + k] for k in range(10)]
    orders[3] = torch.cat([orders[3][:5], torch.tensor([-1, -1]), orders[3][5:]])
    out_index = stack_orders(orders)
    in_index = torch.where(out_index >= 0, (out_index * 7) % 20, -1)
    for merge in ("sum", "mean", "none"):
        args = _multi_scan_inputs("cross", 2, 33, 16, seed=5, layout="mixed", merge=merge)
        K, d = 10, 33
        u, delta, _, B, C = (a[0] if isinstance(a, list) else a for a in args[:5])
        pad = lambda x: torch.cat([x, x[..., :5]], -1)  # noqa: E731  (20 positions)
        A = -torch.exp(torch.randn(K, d, 16, generator=g) * 0.5)
        args[:8] = [[pad(u)] * K, [pad(delta)] * K, A, [pad(B)] * K, [pad(C)] * K, None, torch.randn(K, d, generator=g),
                    None]
        args[8], args[9], args[12] = in_index, out_index, 20
        ref = multi_scan_ref(*args)
        torch.testing.assert_close(_run_multi_scan(cuda(args), "cuda").cpu(), ref, rtol=2e-4, atol=2e-4)


def _bf16(t):
    return t.bfloat16().float()


def _vq_check(out, ref, x, codes, cb, rpg, s, rel):
    """|out - ref| <= rel * sum_k |x w| elementwise: rounding measured against the sum of the products' sizes."""
    w = vq_dequantize_ref(codes, cb, x.shape[-1], rpg, s).abs()
    bound = rel * (x.float().abs() @ w.t()) + 1e-6
    err = (out.cpu() - ref).abs()
    assert out.is_cuda and torch.isfinite(out).all() and (err <= bound).all(), f"max err / bound {(err / bound).max():.2f}"


VQ_CASES = [(5, 16, 8, 4, 16, 8), (7, 30, 13, 4, 4, 5), (65, 192, 384, 8, 256, 384), (197, 768, 3072, 4, 256, 768),
            (33, 64, 70, 1, 16, 70), (9, 27, 40, 3, 8, 7)]


@pytest.mark.parametrize("case", VQ_CASES)
@pytest.mark.parametrize("scale", [True, False])
def test_vq_linear_cuda_matches_twin(case, scale):
    x, codes, cb, rpg, s, bias = _vq_inputs(*case, scale=scale)
    for b in (bias, None):
        # fp32 x: x and the codewords go into the tensor cores as bfloat16, the sums stay fp32
        out = vq_linear(*cuda((x, codes, cb)), rpg, *cuda((s, b)), backend="cuda")
        _vq_check(out, vq_linear_ref(_bf16(x), codes, _bf16(cb.float()), rpg, s, b), x, codes, cb, rpg, s, 1e-4)
        # against the exact twin: bfloat16 keeps 8 significant bits (about 3 digits)
        _vq_check(out, vq_linear_ref(x, codes, cb, rpg, s, b), x, codes, cb, rpg, s, 2 ** -7)
        # fp16 x: x and the fp16 codewords go in as they are
        out = vq_linear(*cuda((x.half(), codes, cb)), rpg, *cuda((s, b)), backend="cuda")
        _vq_check(out, vq_linear_ref(x.half().float(), codes, cb, rpg, s, b), x, codes, cb, rpg, s, 1e-4)


@pytest.mark.parametrize("n,k,d", [(1000, 16, 4), (5000, 300, 8), (777, 5, 1), (2000, 64, 32)])
@pytest.mark.parametrize("weighted", [False, True])
def test_kmeans_assign_cuda_finds_a_nearest_centroid(n, k, d, weighted):
    g = torch.Generator().manual_seed(0)
    x, c = torch.randn(n, d, generator=g), torch.randn(k, d, generator=g)
    w = torch.rand(d, generator=g) if weighted else None
    codes, dist = assign(*cuda((x, c)), w=None if w is None else w.cuda(), return_dist=True, backend="cuda")
    ref_codes, ref_dist = assign_ref(x.double(), c.double(), None if w is None else w.double(), return_dist=True)
    torch.testing.assert_close(dist.cpu().double(), ref_dist, rtol=1e-4, atol=1e-4)
    wd = torch.ones(d, dtype=torch.float64) if w is None else w.double()
    chosen = (wd * (x.double() - c.double()[codes.cpu()]) ** 2).sum(1)
    assert torch.all(chosen <= ref_dist + 1e-4)  # the chosen centroid is (to rounding) a nearest one
    assert (codes.cpu() == ref_codes).float().mean() > 0.99


def test_opcheck_cuda():
    from tests.test_kernels import _opcheck_cases, _opcheck_op

    cases = _opcheck_cases()
    for name in ("bidirectional_scan", "multi_scan", "int8_linear", "int8_linear_requant", "int8_linear_w_sum",
                 "w4a8_linear", "w4a8_linear_w_sum", "quantize_per_token", "vq_linear", "kmeans_assign"):
        torch.library.opcheck(getattr(torch.ops.vmq, _opcheck_op(name)), tuple(cuda(cases[name])))


def test_ops_without_cuda_kernel_run_their_twin_on_cuda():
    """CAPABILITIES "fallback" on CUDA: backend "cuda" runs the twin; torch.ops.vmq runs the default twin."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(2, 5, 24, generator=g), torch.randn(24, generator=g)
    out = rms_norm(*cuda((x, w)), 1e-5, backend="cuda")
    assert out.is_cuda and torch.equal(out, rms_norm_ref(*cuda((x, w)), 1e-5))
    assert torch.equal(torch.ops.vmq.rms_norm(*cuda((x, w)), 1e-5), out)
    conv = _conv_inputs(2, 12, 5, 4)
    for got, want in zip(bidirectional_conv1d_silu(*cuda(conv), backend="cuda"), bidirectional_conv1d_silu_ref(*conv)):
        torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)
    pts, c = torch.randn(50, 3, generator=g), torch.randn(6, 3, generator=g)
    codes = torch.randint(0, 6, (50,), generator=g)
    new = update_centroids(*cuda((pts, codes, c)), backend="cuda")
    torch.testing.assert_close(new.cpu(), update_centroids_ref(pts, codes, c))


def test_model_forward_cuda_matches_cpu():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    x = torch.randn(2, 3, 32, 32)
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # fp32 convs / matmuls, as on the CPU
    try:
        with torch.no_grad():
            with use_backend("ref"):
                ref = model(x)
            with use_backend("cuda"):
                out = model.cuda()(x.cuda())
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3, atol=1e-3)


def test_vq_linear_cuda_takes_activations_beyond_the_fp16_range():
    x, codes, cb, rpg, s, bias = _vq_inputs(65, 192, 384, 8, 256, 384, seed=3)
    x = x * 1e5  # |x| up to about 5e5: fp16 overflows at 65504, bfloat16 has fp32's range
    out = vq_linear(*cuda((x, codes, cb)), rpg, *cuda((s, bias)), backend="cuda")
    _vq_check(out, vq_linear_ref(_bf16(x), codes, _bf16(cb.float()), rpg, s, bias), x, codes, cb, rpg, s, 1e-4)
    _vq_check(out, vq_linear_ref(x, codes, cb, rpg, s, bias), x, codes, cb, rpg, s, 2 ** -7)


def test_vq_linear_cuda_reads_an_out_of_range_code_as_nan():
    """Codes are trusted (no host check per call); a bad one poisons its row instead of reading elsewhere."""
    x, codes, cb, rpg, s, bias = _vq_inputs(5, 16, 8, 4, 16, 8)
    good = vq_linear(*cuda((x, codes, cb)), rpg, *cuda((s, bias)), backend="cuda")
    bad = codes.clone()
    bad[3, 1], bad[5, 0] = cb.shape[1], -1
    out = vq_linear(*cuda((x, bad, cb)), rpg, *cuda((s, bias)), backend="cuda")
    keep = [i for i in range(8) if i not in (3, 5)]
    assert out[..., [3, 5]].isnan().all() and torch.equal(out[..., keep], good[..., keep])


@pytest.mark.parametrize("half", [False, True])
def test_vq_linear_cuda_graph_replays_like_eager(half):
    """No host synchronisation per call: the op can be captured in a CUDA graph."""
    x, codes, cb, rpg, s, bias = cuda(_vq_inputs(65, 192, 384, 8, 256, 384, seed=4))
    x = x.half() if half else x
    fn = lambda: vq_linear(x, codes, cb, rpg, s, bias, backend="cuda")  # noqa: E731
    eager = fn()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager)
    x.mul_(2)  # a replay reads the inputs as they are then
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fn())


def test_gemms_cuda_loop_past_65535_blocks_of_output_channels():
    n, k = 65535 * 64 + 65, 16  # 65537 blocks of 64 channels; grid.y holds 65535, the blocks loop
    g = torch.Generator().manual_seed(11)
    x_q, xs, zp, _, _, _, _, _ = _linear_inputs(1, 3, k, 1, seed=11)
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    ws, bias = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    out = int8_linear(*cuda((x_q, xs, zp, w, ws, bias)), backend="cuda")
    assert torch.equal(out.cpu(), int8_linear_ref(x_q, xs, zp, w, ws, bias))
    codes = torch.randint(0, 16, (n, k // 4), dtype=torch.int32, generator=g)
    cb, x = torch.randn(1, 16, 4, generator=g).half(), torch.randn(1, 3, k, generator=g)
    out = vq_linear(*cuda((x, codes, cb)), n, None, None, backend="cuda")
    _vq_check(out, vq_linear_ref(_bf16(x), codes, _bf16(cb.float()), n), x, codes, cb, n, None, 1e-4)


def test_cuda_kernels_refuse_sizes_their_grids_or_offsets_cannot_take():
    args = cuda(_scan_inputs(65536, 1, 1, 1))
    with pytest.raises(RuntimeError, match="65535 samples"):
        torch.ops.vmq.bidirectional_scan(*args, None, None, None, None, True, True)
    m = 1 << 20  # m x n > 2^31 (the output is never allocated)
    x_q = torch.zeros(1, m, 1, dtype=torch.uint8, device="cuda")
    xs, zp = torch.ones(m, device="cuda"), torch.zeros(m, dtype=torch.int32, device="cuda")
    w, ws = torch.zeros(2049, 1, dtype=torch.int8, device="cuda"), torch.ones(2049, device="cuda")
    with pytest.raises(RuntimeError, match="32-bit"):
        torch.ops.vmq.int8_linear(x_q, xs, zp, w, ws, None, None, None, 8)


def test_int_linear_cuda_refuses_mixed_per_token_kinds():
    lin = _linear_inputs(2, 5, 32, 16, seed=3, per_row=True)
    w4 = pack_int4(torch.clamp(lin[3], -8, 7))
    for label, args in _mixed_kind_calls(lin):
        with pytest.raises(RuntimeError, match="x_scale|x_zero_point|out_scale|out_zero_point"):
            torch.ops.vmq.int8_linear(*cuda(args))
        with pytest.raises(RuntimeError, match="x_scale|x_zero_point|out_scale|out_zero_point"):
            torch.ops.vmq.w4a8_linear(*cuda((*args[:3], w4, *args[4:])))
        with pytest.raises(ValueError, match="per-token parameters"):
            int8_linear(*cuda(args), backend="cuda")
    x = torch.randn(2, 5, 12, device="cuda")
    s, z = torch.rand(2, 5, device="cuda") + 0.1, torch.zeros(2, 5, dtype=torch.int32, device="cuda")
    for ss, zz in ((s.reshape(-1), z.reshape(-1)), (s, z[0])):
        with pytest.raises(RuntimeError, match="scale|zero_point"):
            torch.ops.vmq.quantize_per_token(x, ss, zz, 8)


@pytest.mark.parametrize("shape", [(2, 197, 384, 1536), (3, 65, 96, 38), (2, 9, 7, 3)])
def test_int_linear_cuda_with_cached_w_sum_is_identical(shape):
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(*shape)
    w_sum = w.sum(1, dtype=torch.int32)
    for tail in ((None, None, 8), (os_, oz, 8), (os_, oz % 16, 4)):
        out = torch.ops.vmq.int8_linear(*cuda((x_q, xs, zp, w, ws, bias, *tail, w_sum)))
        assert torch.equal(out.cpu(), int8_linear_ref(x_q, xs, zp, w, ws, bias, *tail))
    if shape[2] % 2 == 0:
        w4 = torch.clamp(w, -8, 7)
        out = w4a8_linear(*cuda((x_q, xs, zp, pack_int4(w4), ws, bias)), w_sum=w4.sum(1, dtype=torch.int32).cuda(),
                          backend="cuda")
        assert torch.equal(out.cpu(), int8_linear_ref(x_q, xs, zp, w4, ws, bias))
    with pytest.raises(RuntimeError, match="w_sum"):
        torch.ops.vmq.int8_linear(*cuda((x_q, xs, zp, w, ws, bias)), None, None, 8, w_sum)  # w_sum on the CPU


@pytest.mark.parametrize("w_bits", [8, 4])
@pytest.mark.parametrize("a_strategy", ["token_dynamic", "token_static"])
def test_quantized_linear_cuda_is_bit_identical_to_cpu(w_bits, a_strategy):
    g = torch.Generator().manual_seed(w_bits)
    q = 2 ** (w_bits - 1)
    w = torch.randint(-q + 1, q, (96, 64), dtype=torch.int8, generator=g)
    static = a_strategy == "token_static"
    in_s = torch.rand(13, generator=g) * 0.05 + 0.01 if static else None
    in_z = torch.randint(0, 256, (13,), dtype=torch.int32, generator=g) if static else None
    layer = QuantizedLinear(w, torch.rand(96, generator=g) * 0.01, w_bits, "channel", 8, a_strategy, in_s, in_z,
                            bias=torch.randn(96, generator=g))
    x = torch.randn(2, 13, 64, generator=g) * 2
    with torch.no_grad():
        want = layer(x)
        got = layer.cuda()(x.cuda())
    assert got.is_cuda and torch.equal(got.cpu(), want)
    assert layer.kernels._w_sum[1].is_cuda  # the cached row sums followed the layer to the GPU


def test_quantize_per_token_cuda_many_rows_long_rows_and_misaligned_input():
    g = torch.Generator().manual_seed(12)
    cases = [(1, 70001, 520), (1, 70001, 7), (3, 30001, 12), (1, 1, 65535 * 1024 + 5)]  # blocks beyond 65535 on
    for shape in cases:  # x (one row each) and on y (column chunks, looping)
        x = torch.randn(*shape, generator=g) * 3
        for per_row in (False, True):
            pshape = shape[:-1] if per_row else shape[-2:-1]
            s = torch.rand(pshape, generator=g) * 0.05 + 0.01
            z = torch.randint(0, 256, pshape, dtype=torch.int32, generator=g)
            ref = quantize_per_token_ref(x, s, z, 8)
            out = quantize_per_token(*cuda((x, s, z)), 8, backend="cuda")
            assert torch.equal(out.cpu(), ref), (shape, per_row)
    x = torch.randn(2, 9, 16, generator=g)
    s, z = torch.rand(9, generator=g) + 0.01, torch.randint(0, 16, (9,), dtype=torch.int32, generator=g)
    flat = torch.zeros(x.numel() + 1, device="cuda")
    flat[1:] = x.reshape(-1).cuda()
    xm = flat[1:].view(x.shape)  # contiguous, 4 bytes past a 16-byte boundary: the scalar path
    assert xm.data_ptr() % 16 and torch.equal(quantize_per_token(xm, *cuda((s, z)), 4, backend="cuda").cpu(),
                                              quantize_per_token_ref(x, s, z, 4))


@pytest.mark.parametrize("n", [1, 5, 16, 17, 33, 64])
def test_bidirectional_scan_cuda_padded_states_stay_exact(n):
    """B and C are zero-padded to 16 or 64 states: the padded states must add nothing."""
    args = _scan_inputs(2, 40, 37, n, seed=n)
    ref = bidirectional_scan_ref(*args, None, None, None, None, True, True)
    out = bidirectional_scan(*cuda(args), delta_softplus=True, divide_out=True, backend="cuda")
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-4, atol=2e-4)
    args[1] = torch.full_like(args[1], 60.0)  # large deltas (softplus passes them through)
    args[7] = torch.full_like(args[7], -60.0)  # and tiny ones
    args[12] = torch.full_like(args[12], -200.0)  # silu of a very negative gate
    ref = bidirectional_scan_ref(*args, None, None, None, None, True, True)
    out = bidirectional_scan(*cuda(args), delta_softplus=True, divide_out=True, backend="cuda").cpu()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-5)
