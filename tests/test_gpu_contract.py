"""The CUDA kernels' contract under conditions tests/test_kernels_gpu.py never creates (marker ``gpu``).

Each kernel against its PyTorch twin with: outputs that start as NaN / 0xFF bytes (an element a
kernel never writes shows), misaligned (odd storage offset) and strided inputs, sizes past one
launch's grid, non-default streams, CUDA graph capture, the variants the plain tests skip, a
quantized model's integer layers against the CPU kernels (bit-identical: the arithmetic is
integer), repeated runs (bit-identical) and tensors on the wrong device.
"""

import copy

import pytest
import timm
import torch

import vmq.models  # noqa: F401  (registers the models)
from tests._gpu_util import capture, cuda, floats, misaligned, poisoned, quantize_linears, spread, vim_scan
from tests.test_kernels import _linear_inputs, _multi_scan_inputs, _run_multi_scan, _scan_inputs, _vq_inputs
from vmq.ops import _library
from vmq.ops.backend import use_backend
from vmq.ops.kmeans import assign, assign_ref
from vmq.ops.linear import int8_linear_ref, pack_int4, vq_linear_ref, w4a8_linear_ref
from vmq.ops.multi_scan import multi_scan, multi_scan_ref
from vmq.ops.quantize import quantize_per_token_ref
from vmq.ops.scan import bidirectional_scan_ref

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_library.NATIVE is None or not getattr(_library.NATIVE, "cuda_built", False),
                                 reason="vmq._C was built without CUDA kernels")]
V = torch.ops.vmq


def test_poisoned_outputs_start_as_nan_and_ff():
    with poisoned():
        f, q = torch.empty(1000, device="cuda"), torch.empty(1000, dtype=torch.uint8, device="cuda")
        assert f.isnan().all() and (q == 255).all()
    assert torch.are_deterministic_algorithms_enabled() is False


LINEAR_SHAPES = [(2, 197, 384, 1536), (3, 65, 96, 200), (1, 13, 48, 38), (2, 9, 12, 192), (1, 7, 33, 17)]
LAYOUTS = ["plain", "misaligned x", "misaligned w", "strided x", "strided w", "strided parameters"]


def _arrange(layout, x_q, w, params):
    x_q, w, params = x_q.cuda(), w.cuda(), [None if p is None else p.cuda() for p in params]
    if layout == "misaligned x":
        x_q = misaligned(x_q)
    elif layout == "misaligned w":
        w = misaligned(w)
    elif layout == "strided x":
        x_q = x_q.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided w":
        w = w.t().contiguous().t()
    elif layout == "strided parameters":
        params = [None if p is None else spread(p) for p in params]
    return x_q, w, params


@pytest.mark.parametrize("shape", LINEAR_SHAPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("per_row", [False, True])
def test_int8_and_w4a8_linear_fill_every_output_from_any_layout(shape, layout, per_row):
    """Bit-identical to the twin; a 4-bit requantized output (0..15) cannot hide an unwritten 255."""
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(*shape, seed=11, per_row=per_row)
    w = torch.clamp(w, -8, 7)
    oz = oz % 16
    ref, ref_q = int8_linear_ref(x_q, xs, zp, w, ws, bias), int8_linear_ref(x_q, xs, zp, w, ws, bias, os_, oz, 4)
    packed = pack_int4(w) if shape[2] % 2 == 0 else None
    for weight, op, twin in ((w, V.int8_linear, int8_linear_ref), (packed, V.w4a8_linear, w4a8_linear_ref)):
        if weight is None:
            continue
        xx, ww, (s, z, wsc, b, osc, ozp) = _arrange(layout, x_q, weight, [xs, zp, ws, bias, os_, oz])
        with poisoned():
            out, out_q = op(xx, s, z, ww, wsc, b, None, None, 8), op(xx, s, z, ww, wsc, b, osc, ozp, 4)
        assert torch.equal(out.cpu(), ref), f"{op}: float output"
        assert torch.equal(out_q.cpu(), ref_q), f"{op}: requantized output"
        assert torch.equal(twin(x_q, xs, zp, weight, ws, bias), ref)


@pytest.mark.parametrize("layout", ["plain", "misaligned x", "strided x", "strided parameters"])
@pytest.mark.parametrize("per_row", [False, True])
def test_quantize_per_token_fills_every_output_from_any_layout(layout, per_row):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 65, 200, generator=g) * 4
    x[0, 0, :6] = torch.tensor([1e30, -1e30, 3e7, -3e7, 0.5, -0.5])
    pshape = (3, 65) if per_row else (65,)
    scale = torch.rand(pshape, generator=g) * 0.05 + 0.01
    zp = torch.randint(0, 16, pshape, dtype=torch.int32, generator=g)
    xx, s, z = cuda((x, scale, zp))
    if layout == "misaligned x":
        xx = misaligned(xx)
    elif layout == "strided x":
        xx = xx.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif layout == "strided parameters":
        s, z = spread(s), spread(z)
    for bits in (4, 8):
        with poisoned():
            out = V.quantize_per_token(xx, s, z, bits)
        assert torch.equal(out.cpu(), quantize_per_token_ref(x, scale, zp, bits)), bits


def test_quantize_per_token_past_one_launch_grid():
    """19.4 M elements: more than 65535 blocks of 256 threads, so the grid-stride loop runs."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 197, 1536, generator=g) * 3
    x[0, 0, :4] = torch.tensor([1e30, -1e30, 3e7, -3e7])
    x[-1, -1, -4:] = torch.tensor([1e30, -1e30, 3e7, -3e7])
    row_s = torch.rand(64, 197, generator=g) * 0.05 + 0.01
    row_z = torch.randint(0, 256, (64, 197), dtype=torch.int32, generator=g)
    xc = x.cuda()
    for s, z in ((row_s, row_z), (row_s[0], row_z[0])):
        for bits in (8, 4):
            with poisoned():
                out = V.quantize_per_token(xc, s.cuda(), (z % (1 << bits)).cuda(), bits)
            assert torch.equal(out.cpu(), quantize_per_token_ref(x, s, z % (1 << bits), bits)), (s.shape, bits)


@pytest.mark.parametrize("case", [(65, 192, 384, 8, 256, 384), (7, 31, 13, 3, 4, 5), (33, 64, 70, 1, 16, 70)])
@pytest.mark.parametrize("variant", ["fp32", "fp16 x", "no scale, no bias", "misaligned x", "strided x"])
def test_vq_linear_variants_fill_every_output(case, variant):
    x, codes, cb, rpg, s, bias = _vq_inputs(*case, seed=2)
    if variant == "no scale, no bias":
        s = bias = None
    xx = cuda([x.half() if variant == "fp16 x" else x])[0]
    if variant == "misaligned x":
        xx = misaligned(xx)
    elif variant == "strided x":
        xx = xx.transpose(0, 1).contiguous().transpose(0, 1)
    ref = vq_linear_ref(x.half().float(), codes, cb, rpg, s, bias)
    with poisoned():
        out = V.vq_linear(xx, *cuda((codes, cb)), rpg, *cuda((s, bias)))
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-3, atol=2e-2)


SCAN_VARIANTS = {
    "int8 u/delta, fp16 B/C/z": lambda: vim_scan(2, 64, 33, 16, 1, torch.int8, torch.float16),
    "int8 u/delta, fp32 B/C/z": lambda: vim_scan(2, 64, 33, 16, 2, torch.int8),
    "fp16 everything": lambda: vim_scan(2, 64, 33, 16, 3, torch.float16, torch.float16),
    "d_state 1": lambda: vim_scan(2, 130, 70, 1, 4),
    "d_state 17": lambda: vim_scan(2, 130, 70, 17, 5),
    "d_state 64": lambda: vim_scan(1, 64, 40, 64, 6, merge="none"),
    "L 4096": lambda: vim_scan(1, 256, 4096, 16, 7),
    "batch 300": lambda: vim_scan(300, 40, 9, 16, 8, merge="sum"),
    "padding steps, merge none": lambda: _multi_scan_inputs("local", 2, 130, 16, seed=9, layout="mixed",
                                                            shared_u=True, merge="none"),
    "inputs in scan order": lambda: _multi_scan_inputs("scan_order", 2, 40, 5, seed=10, layout="channel"),
}


@pytest.mark.parametrize("variant", sorted(SCAN_VARIANTS))
def test_multi_scan_variants_fill_every_output(variant):
    args = SCAN_VARIANTS[variant]()
    ref = multi_scan_ref(*floats(args))
    low = any(t.dtype == torch.float16 for t in args[3]) or args[12] > 1000
    with poisoned():
        out = _run_multi_scan(cuda(args), "cuda")
    assert not out.isnan().any()
    torch.testing.assert_close(out.cpu(), ref, rtol=1e-3 if low else 2e-4, atol=1e-3 if low else 2e-4)


def test_multi_scan_without_d_z_bias_or_softplus_and_misaligned_inputs():
    args = vim_scan(2, 130, 70, 16, 11)
    args[5] = args[6] = args[7] = None
    args[1] = [x.abs() for x in args[1]]
    args[13] = False
    ref = multi_scan_ref(*args)
    a = cuda(args)
    a[0] = [misaligned(x) for x in a[0]]  # u at an odd 4-byte offset
    with poisoned():
        out = _run_multi_scan(a, "cuda")
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-4, atol=2e-4)


def test_multi_scan_propagates_nan_like_the_twin():
    args = vim_scan(2, 20, 9, 16, 12)
    args[1][0][0, 3, 2] = float("nan")
    ref, out = multi_scan_ref(*args), _run_multi_scan(cuda(args), "cuda").cpu()
    assert ref.isnan().any() and torch.equal(out.isnan(), ref.isnan())
    torch.testing.assert_close(out, ref, rtol=2e-4, atol=2e-4, equal_nan=True)


def test_bidirectional_scan_baseline_variants():
    args = _scan_inputs(2, 130, 70, 16, seed=1)
    args[5] = args[11] = args[12] = None
    args[1], args[7] = args[1].abs(), args[7].abs()
    ref = bidirectional_scan_ref(*args, None, None, None, None, False, False)
    with poisoned():
        out = V.bidirectional_scan(*cuda(args), None, None, None, None, False, False)
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("d", [3, 12, 31])
def test_kmeans_assign_with_full_weights(d):
    g = torch.Generator().manual_seed(d)
    x, c, w = torch.randn(3000, d, generator=g), torch.randn(300, d, generator=g), torch.rand(3000, d, generator=g)
    with poisoned():
        codes, dist = assign(*cuda((x, c)), w=w.cuda(), return_dist=True, backend="cuda")
    ref_codes, ref_dist = assign_ref(x.double(), c.double(), w.double(), return_dist=True)
    torch.testing.assert_close(dist.cpu().double(), ref_dist, rtol=1e-4, atol=1e-4)
    assert (codes.cpu() == ref_codes).float().mean() > 0.99


def test_kernels_run_on_the_current_stream():
    """Inputs made at the end of long work queued on a side stream: kernels called on that stream must wait."""
    lin = _linear_inputs(2, 197, 384, 1536, seed=9)
    ref = int8_linear_ref(*lin[:6])
    scan = vim_scan(2, 192, 197, 16, 9)
    sref = multi_scan_ref(*scan)
    x = torch.randn(2, 197, 384)
    qref = quantize_per_token_ref(x, lin[1], lin[2])
    lc, sc, xc = cuda(lin), cuda(scan), x.cuda()
    packed = pack_int4(torch.clamp(lc[3], -8, 7))  # (checks its range on the host: before the race is set up)
    side = torch.cuda.Stream()
    with poisoned():
        torch.cuda.synchronize()
        with torch.cuda.stream(side):
            a = torch.randn(4096, 4096, device="cuda")
            for _ in range(8):  # tens of milliseconds queued before the inputs exist
                a = a @ a / 64
            x_q, u, xf = lc[0] + 0, [t * 1 for t in sc[0]], xc * 1
            out = V.int8_linear(x_q, *lc[1:6], None, None, 8)
            w4 = V.w4a8_linear(x_q, *lc[1:3], packed, *lc[4:6], None, None, 8)
            sout = _run_multi_scan([u] + sc[1:], "cuda")
            qout = V.quantize_per_token(xf, *lc[1:3], 8)
        side.synchronize()
    assert torch.equal(out.cpu(), ref)
    assert torch.equal(w4.cpu(), w4a8_linear_ref(*lin[:3], pack_int4(torch.clamp(lin[3], -8, 7)), *lin[4:6]))
    torch.testing.assert_close(sout.cpu(), sref, rtol=2e-4, atol=2e-4)
    assert torch.equal(qout.cpu(), qref)


def test_cuda_graph_capture_and_replay():
    """int8_linear, w4a8_linear, quantize_per_token and multi_scan (fp32, int8) captured once, replayed on new inputs."""
    lin = _linear_inputs(2, 197, 384, 1536, seed=10)
    packed = pack_int4(torch.clamp(lin[3], -8, 7))
    fp32, int8 = vim_scan(2, 192, 197, 16, 10), vim_scan(2, 192, 197, 16, 11, torch.int8)
    x = torch.randn(2, 197, 384)
    lc, pc, s32, s8, xc = cuda(lin), packed.cuda(), cuda(fp32), cuda(int8), x.cuda()
    calls = {
        "int8_linear": (lambda: V.int8_linear(*lc[:6], None, None, 8), [lc[0]]),
        "w4a8_linear": (lambda: V.w4a8_linear(*lc[:3], pc, *lc[4:6], None, None, 8), [lc[0]]),
        "quantize_per_token": (lambda: V.quantize_per_token(xc, *lc[1:3], 8), [xc]),
        "multi_scan fp32": (lambda: _run_multi_scan(s32, "cuda"), s32[0]),
        "multi_scan int8": (lambda: _run_multi_scan(s8, "cuda"), s8[0]),
    }
    for name, (fn, inputs) in calls.items():
        graph, out = capture(fn)
        g = torch.Generator(device="cuda").manual_seed(1)
        for t in inputs:  # new values into the captured input buffers
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, device="cuda", generator=g))
            else:
                low, high = (0, 256) if t.dtype == torch.uint8 else (-127, 128)
                t.copy_(torch.randint(low, high, t.shape, dtype=t.dtype, device="cuda", generator=g))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, fn()), name


@pytest.mark.parametrize("w_bits,a_strategy", [(8, "token_static"), (4, "token_static"), (4, "tensor_static"),
                                               (8, "token_dynamic")])
def test_quantized_model_integer_layers_match_the_cpu_kernels(w_bits, a_strategy):
    """Each QuantizedLinear on CUDA (quantize + int8 / W4A8 GEMM) equals the CPU kernels bit for bit on the
    same input; the whole model agrees to rounding (the scans and norms differ in the last bits)."""
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    images = torch.randn(8, 3, 32, 32)
    names = quantize_linears(model, images[:4], w_bits, a_strategy)
    inputs = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, name=n: inputs.__setitem__(name, a[0].detach().clone())) for n in names]
    with torch.no_grad(), use_backend("cpu"):
        ref = model(images[4:])
        for h in hooks:
            h.remove()
        want = {n: model.get_submodule(n)(x) for n, x in inputs.items()}
    gpu = copy.deepcopy(model).cuda()
    with torch.no_grad(), use_backend("cuda"):
        for n, x in inputs.items():
            assert torch.equal(gpu.get_submodule(n)(x.cuda()).cpu(), want[n]), n
        out, again = gpu(images[4:].cuda()), gpu(images[4:].cuda())
    assert torch.equal(out, again)
    torch.testing.assert_close(out.cpu(), ref, rtol=0, atol=0.01 * ref.abs().max().item())


def test_repeated_runs_are_bit_identical():
    lin = cuda(_linear_inputs(64, 197, 768, 3072, seed=12))
    scan = cuda(vim_scan(8, 1536, 197, 16, 12))
    vq = cuda(list(_vq_inputs(197, 768, 3072, 4, 256, 3072, seed=12)))
    x = torch.randn(64, 197, 1536, device="cuda")
    for fn in (lambda: V.int8_linear(*lin[:6], None, None, 8), lambda: _run_multi_scan(scan, "cuda"),
               lambda: V.vq_linear(*vq), lambda: V.quantize_per_token(x, lin[1], lin[2], 8)):
        outs = [fn() for _ in range(3)]
        assert all(torch.equal(outs[0], o) for o in outs[1:])


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_kernels_follow_their_inputs_device():
    lin = _linear_inputs(2, 65, 96, 200, seed=4)
    scan = vim_scan(2, 64, 33, 16, 4)
    on1 = lambda ts: [t.to("cuda:1") if isinstance(t, torch.Tensor) else on1(t) if isinstance(t, list) else t  # noqa: E731
                      for t in ts]
    with torch.cuda.device(0):
        out = V.int8_linear(*on1(lin[:6]), None, None, 8)
        sout = multi_scan(*on1(scan[:8]), scan[8].to("cuda:1"), scan[9].to("cuda:1"), scan[12], True, "mean",
                          backend="cuda")
    assert out.device == torch.device("cuda:1") and torch.equal(out.cpu(), int8_linear_ref(*lin[:6]))
    torch.testing.assert_close(sout.cpu(), multi_scan_ref(*scan), rtol=2e-4, atol=2e-4)


def test_cuda_kernels_refuse_a_cpu_tensor():  # (near the end: a kernel given a host pointer would break the context)
    lin = cuda(_linear_inputs(2, 5, 32, 16))
    scan = cuda(vim_scan(2, 8, 5, 4))
    vq = cuda(list(_vq_inputs(5, 16, 8, 4, 16, 8)))
    calls = [lambda: V.int8_linear(lin[0], lin[1], lin[2], lin[3].cpu(), lin[4], lin[5], None, None, 8),
             lambda: V.int8_linear(lin[0], lin[1].cpu(), *lin[2:6], None, None, 8),
             lambda: V.quantize_per_token(torch.randn(2, 5, 32, device="cuda"), lin[1].cpu(), lin[2], 8),
             lambda: V.multi_scan(*scan[:2], scan[2].cpu(), *scan[3:]),
             lambda: V.vq_linear(vq[0], vq[1].cpu(), *vq[2:]),
             lambda: V.kmeans_assign(torch.randn(50, 3, device="cuda"), None, torch.randn(6, 3))]
    for call in calls:
        with pytest.raises(RuntimeError):
            call()
        torch.cuda.synchronize()  # the device is still healthy
    assert torch.equal(V.int8_linear(*lin[:6], None, None, 8).cpu(), int8_linear_ref(*[t.cpu() for t in lin[:6]]))


def test_out_parameters_per_row_and_per_token_mixed_are_refused_or_exact():
    """x_scale / out_scale per row (B*T), out_zero_point per token (T): the twin broadcasts; the kernel
    must either refuse the mix or read out_zero_point in bounds as the twin does."""
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(2, 5, 32, 16, seed=3, per_row=True)
    ref = int8_linear_ref(x_q, xs, zp, w, ws, bias, os_, oz[0] % 16, 4)
    try:
        out = V.int8_linear(*cuda((x_q, xs, zp, w, ws, bias, os_, oz[0] % 16)), 4)
    except RuntimeError:
        return
    assert torch.equal(out.cpu(), ref)


def test_vq_linear_is_captured_or_refused_cleanly():
    """Last in the file: a refused capture must leave the device usable (the binding may check codes on the host)."""
    x, codes, cb, rpg, s, bias = _vq_inputs(5, 16, 8, 4, 16, 8)
    args = cuda((x, codes, cb))
    ref = vq_linear_ref(x.half().float(), codes, cb, rpg, s, bias)
    call = lambda: V.vq_linear(*args, rpg, *cuda((s, bias)))  # noqa: E731
    try:
        graph, out = capture(call)
        graph.replay()
    except RuntimeError:
        torch.cuda.synchronize()
        out = call()
    torch.testing.assert_close(out.cpu(), ref, rtol=2e-3, atol=2e-2)
