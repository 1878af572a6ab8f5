"""Compiled kernels of vmq._C held to their PyTorch twins, and torch.library.opcheck on every op.

Skipped where vmq._C is not built (CI sets VMQ_REQUIRE_NATIVE=1, which makes a missing build an
error instead). GPU kernels' tests carry the ``gpu`` marker.
"""

import pytest
import timm
import torch
import torch.nn.functional as F

import vmq.models  # noqa: F401  (registers the models)
from vmq.errors import VmqError
from vmq.layers import QuantizedLinear, VQLinear
from vmq.ops import _library
from vmq.ops.backend import use_backend, use_native
from vmq.ops.conv import bidirectional_conv1d_silu, bidirectional_conv1d_silu_ref
from vmq.models.scan_orders import cross_orders, direction_order, sequence_orders, stack_orders
from vmq.ops.linear import (int8_linear, int8_linear_from_float, int8_linear_from_float_ref, int8_linear_ref,
                            pack_int4, unpack_int4_ref, vq_linear, vq_linear_ref, w4a8_linear, w4a8_linear_ref)
from vmq.ops.norm import rms_norm, rms_norm_ref
from vmq.ops.multi_scan import multi_scan, multi_scan_ref
from vmq.ops.quantize import quantize_per_token, quantize_per_token_ref, range_to_qparams
from vmq.ops.scan import bidirectional_scan, bidirectional_scan_ref
from vmq.pack.bits import pack_signed

native = pytest.mark.skipif(_library.NATIVE is None, reason=f"vmq._C is {_library.NATIVE_ERROR}")


def _scan_inputs(b, d, l, n, seed=0, token_major=False):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731

    def act(scale=1.0, shift=0.0):
        x = r(b, d, l) * scale + shift
        return x.transpose(1, 2).contiguous().transpose(1, 2) if token_major else x

    out = []
    for _ in range(2):
        out += [act(), act(0.5, -1.0), -torch.exp(r(d, n) * 0.5), r(b, n, l), r(b, n, l), r(d)]
    return out + [act()]


def _scan_twin(args, delta_softplus, divide_out=True, u_scale=None, delta_scale=None, u_b_scale=None,
               delta_b_scale=None):
    """bidirectional_scan_ref on the 13 tensors of _scan_inputs (the schema's argument order)."""
    return bidirectional_scan_ref(*args, u_scale, delta_scale, u_b_scale, delta_b_scale, delta_softplus, divide_out)


@native
@pytest.mark.parametrize("shape", [(2, 19, 13, 16), (2, 16, 7, 5), (1, 8, 1, 16), (3, 40, 30, 16)])
@pytest.mark.parametrize("token_major", [False, True])
@pytest.mark.parametrize("divide_out", [True, False])
def test_bidirectional_scan_matches_twin(shape, token_major, divide_out):
    args = _scan_inputs(*shape, token_major=token_major)
    ref = _scan_twin(args, True, divide_out)
    out = bidirectional_scan(*args, delta_softplus=True, divide_out=divide_out, backend="cpu")
    assert out.shape == ref.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


@native
def test_bidirectional_scan_without_gate_skip_or_softplus():
    args = _scan_inputs(2, 12, 9, 4, seed=1)
    args[5] = args[11] = args[12] = None  # D, D_b, z
    args[1] = args[1].abs()
    args[7] = args[7].abs()  # delta already positive
    ref = _scan_twin(args, False)
    torch.testing.assert_close(bidirectional_scan(*args, backend="cpu"), ref, rtol=2e-5, atol=2e-5)


@native
def test_bidirectional_scan_int8_inputs_match_dequantized_twin():
    b, d, l, n = 2, 24, 11, 16
    args = _scan_inputs(b, d, l, n, seed=2)
    g = torch.Generator().manual_seed(3)
    scales = {}
    for i, key in ((0, "u_scale"), (1, "delta_scale"), (6, "u_b_scale"), (7, "delta_b_scale")):
        args[i] = torch.randint(-127, 128, (b, d, l), dtype=torch.int8, generator=g)
        scales[key] = torch.rand(l, generator=g) * 0.02 + 0.001
    ref = _scan_twin(args, True, **scales)
    out = bidirectional_scan(*args, delta_softplus=True, backend="cpu", **scales)
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)
    with pytest.raises(ValueError, match="per-token scale"):
        bidirectional_scan(*args, delta_softplus=True, backend="ref")


@native
def test_scan_kernel_extreme_inputs_stay_finite():
    args = _scan_inputs(1, 8, 6, 16, seed=4)
    args[1] = torch.full_like(args[1], 60.0)  # softplus passes large deltas through
    args[7] = torch.full_like(args[7], -60.0)  # and tiny ones: exp(-60)
    args[12] = torch.full_like(args[12], -200.0)  # silu of a very negative gate
    out = bidirectional_scan(*args, delta_softplus=True, backend="cpu")
    ref = _scan_twin(args, True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


@native
def test_scan_kernel_propagates_nan_like_twin():
    args = _scan_inputs(2, 20, 9, 16, seed=6)
    args[1][0, 3, 2] = float("nan")  # through softplus, the decay and the state
    out = bidirectional_scan(*args, delta_softplus=True, backend="cpu")
    ref = _scan_twin(args, True)
    assert torch.isnan(ref).any() and torch.equal(torch.isnan(out), torch.isnan(ref))
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5, equal_nan=True)


def _multi_scan_orders(case):
    """(in_index, out_index, positions, seqlen) of a named set of scan orders."""
    if case == "vim":  # forward and backward over a sequence
        o = sequence_orders(13)
        return o, o, 13, 13
    if case == "cross":  # VMamba's four, on a grid with H != W
        o = cross_orders(3, 5)
        return o, o, 15, 15
    if case == "local":  # LocalMamba's windows with padding, their flip, shorter orders (one visits 4 tokens)
        o = stack_orders([direction_order("w2", 3, 5), direction_order("w2_flip", 3, 5), direction_order("v", 3, 5),
                          torch.arange(4).flip(0)])
        return o, o, 15, 15
    if case == "scan_order":  # no in_index: the inputs already in scan order, padding steps included
        o = stack_orders([direction_order("w2", 3, 3), direction_order("w2_flip", 3, 3)])
        return None, o, o.shape[1], 9
    raise ValueError(case)


def _multi_scan_inputs(case, b=2, d=19, n=5, seed=0, layout="token", shared_u=False, int8=(), merge="sum"):
    """The schema's arguments of vmq::multi_scan. layout: token- or channel-major u, delta, B, C and
    z, or "mixed" (u channel-major, the rest token-major, as a conv and Linear layers leave them);
    int8: which of u, delta are int8 (with scales); shared_u: one u tensor for every direction."""
    in_index, out_index, positions, seqlen = _multi_scan_orders(case)
    K = out_index.shape[0]
    g = torch.Generator().manual_seed(seed)

    def t(rows, length, major, scale=1.0, shift=0.0, quantized=False):  # (b, rows, length) in that storage
        x = torch.randn(b, length, rows, generator=g) * scale + shift
        if quantized:
            x = torch.randint(-127, 128, x.shape, dtype=torch.int8, generator=g)
        return x.transpose(1, 2) if major == "token" else x.transpose(1, 2).contiguous()

    u_major = "channel" if layout == "mixed" else layout
    f_major = "token" if layout == "mixed" else layout
    u0 = t(d, positions, u_major, quantized="u" in int8)
    u = [u0 if shared_u else t(d, positions, u_major, quantized="u" in int8) for _ in range(K)]
    delta = [t(d, positions, f_major, 0.5, -1.0, quantized="delta" in int8) for _ in range(K)]
    A = -torch.exp(torch.randn(K, d, n, generator=g) * 0.5)
    B = [t(n, positions, f_major) for _ in range(K)]
    C = [t(n, positions, f_major) for _ in range(K)]
    D, bias = torch.randn(K, d, generator=g), torch.randn(K, d, generator=g) * 0.5
    z = t(d, seqlen, f_major)
    scales = [torch.rand(K, positions, generator=g) * s + 1e-3 if key in int8 else None
              for key, s in (("u", 0.02), ("delta", 0.01))]
    return [u, delta, A, B, C, D, bias, z, in_index, out_index, *scales, seqlen, True, merge]


def _run_multi_scan(args, backend):
    """vmq.ops.multi_scan on the schema's arguments."""
    u, delta, A, B, C, D, bias, z, in_index, out_index, u_scale, delta_scale, seqlen, softplus, merge = args
    return multi_scan(u, delta, A, B, C, D, bias, z, in_index, out_index, seqlen, softplus, merge, u_scale,
                      delta_scale, backend=backend)


@native
@pytest.mark.parametrize("case", ["vim", "cross", "local", "scan_order"])
@pytest.mark.parametrize("merge", ["sum", "mean", "none"])
@pytest.mark.parametrize("layout", ["token", "channel", "mixed"])
@pytest.mark.parametrize("shape", [(2, 19, 5), (1, 40, 16), (2, 24, 1)])
def test_multi_scan_matches_twin(case, merge, layout, shape):
    b, d, n = shape
    args = _multi_scan_inputs(case, b, d, n, layout=layout, shared_u=layout != "token", merge=merge)
    ref = multi_scan_ref(*args)
    out = _run_multi_scan(args, "cpu")
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert out.transpose(-1, -2).is_contiguous()  # token-major storage, as the fake implementation says
    torch.testing.assert_close(out, ref, rtol=2e-5, atol=2e-5)


@native
def test_multi_scan_with_vim_orders_is_the_bidirectional_scan():
    args = _multi_scan_inputs("vim", 2, 24, 16, merge="mean")
    u, delta, A, B, C, D = args[:6]
    args[6] = None  # the bidirectional scan has no delta_bias
    out = _run_multi_scan(args, "cpu")
    bi = bidirectional_scan(u[0], delta[0], A[0], B[0], C[0], D[0], u[1], delta[1], A[1], B[1], C[1], D[1], args[7],
                            delta_softplus=True, divide_out=True, backend="cpu")
    torch.testing.assert_close(out, bi, rtol=1e-6, atol=1e-6)


@native
@pytest.mark.parametrize("case", ["vim", "local", "scan_order"])
@pytest.mark.parametrize("layout", ["token", "channel"])
@pytest.mark.parametrize("int8", [("u", "delta"), ("u",)])
def test_multi_scan_int8_inputs_match_dequantized_twin(case, layout, int8):
    args = _multi_scan_inputs(case, 2, 24, 16, seed=2, layout=layout, shared_u=True, int8=int8, merge="mean")
    torch.testing.assert_close(_run_multi_scan(args, "cpu"), multi_scan_ref(*args), rtol=2e-5, atol=2e-5)


@native
@pytest.mark.parametrize("merge", ["sum", "none"])
def test_multi_scan_without_gate_skip_bias_or_softplus(merge):
    args = _multi_scan_inputs("local", 2, 12, 4, seed=1, merge=merge)
    args[5] = args[7] = None  # D, z
    args[1] = [x.abs() for x in args[1]]  # delta already positive
    args[6] = args[6].abs()
    args[13] = False
    torch.testing.assert_close(_run_multi_scan(args, "cpu"), multi_scan_ref(*args), rtol=2e-5, atol=2e-5)
    args[6] = None  # nor delta_bias
    torch.testing.assert_close(_run_multi_scan(args, "cpu"), multi_scan_ref(*args), rtol=2e-5, atol=2e-5)


@native
def test_multi_scan_rejects_bad_inputs():
    args = _multi_scan_inputs("local", 2, 12, 4)
    op = torch.ops.vmq.multi_scan

    def bad(match, i, value):
        a = list(args)
        a[i] = value
        with pytest.raises(RuntimeError, match=match):
            op(*a)

    u, delta, A, B, C = args[:5]
    bad("one tensor per direction", 1, delta[:3])
    bad("A must be", 2, A[:3])
    bad(r"B\[1\] and C\[1\]", 3, [B[0], B[1][..., :-1], *B[2:]])
    bad("float32 or int8", 0, [x.double() for x in u])
    bad("needs its scales", 0, [x.to(torch.int8) for x in u])
    bad("a scale goes with int8", 10, torch.ones(4, 15))
    bad("D must be", 5, args[5][:, :-1])
    bad("z must be", 7, args[7][..., :-1])
    bad("out_index values", 9, torch.where(args[9] == 3, 15, args[9]))
    bad("in_index values", 8, torch.where(args[8] == 3, -2, args[8]))
    bad("in_index must have", 8, args[8][:, :-1])
    bad("scan order", 8, None)
    bad("merge must be", 14, "max")
    assert op(*args).shape == multi_scan_ref(*args).shape


def _linear_inputs(batch, tokens, k, n, seed=0, per_row=False):
    g = torch.Generator().manual_seed(seed)
    x_q = torch.randint(0, 256, (batch, tokens, k), dtype=torch.uint8, generator=g)
    pshape = (batch, tokens) if per_row else (tokens,)
    zp = torch.randint(0, 256, pshape, dtype=torch.int32, generator=g)
    xs = torch.rand(pshape, generator=g) * 0.1 + 1e-3
    w = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=g)
    ws = torch.rand(n, generator=g) * 0.01
    bias = torch.randn(n, generator=g)
    out_scale = torch.rand(pshape, generator=g) * 2 + 0.05
    out_zp = torch.randint(0, 256, pshape, dtype=torch.int32, generator=g)
    return x_q, xs, zp, w, ws, bias, out_scale, out_zp


@native
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 7, 3), (3, 65, 96, 384), (1, 13, 192, 38), (2, 9, 6, 192),
                                   (1, 7, 33, 17), (2, 197, 384, 1536), (2, 3, 0, 4)])
@pytest.mark.parametrize("per_row", [False, True])
def test_int8_linear_is_bit_identical_to_twin(shape, per_row):
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(*shape, per_row=per_row)
    assert torch.equal(int8_linear(x_q, xs, zp, w, ws, bias, backend="cpu"), int8_linear_ref(x_q, xs, zp, w, ws, bias))
    assert torch.equal(int8_linear(x_q, xs, zp, w, ws, None, backend="cpu"), int8_linear_ref(x_q, xs, zp, w, ws))
    for bits in (8, 4):
        ref = int8_linear_ref(x_q, xs, zp, w, ws, bias, os_, oz % (1 << bits), bits)
        out = int8_linear(x_q, xs, zp, w, ws, bias, os_, oz % (1 << bits), bits, backend="cpu")
        assert out.dtype == torch.uint8 and torch.equal(out, ref)


@native
def test_int8_linear_extreme_values_are_exact():
    # all-255 activations against all -128 weights: the worst case for 16-bit pair sums
    k, n = 512, 16
    x_q = torch.full((1, 4, k), 255, dtype=torch.uint8)
    zp = torch.zeros(4, dtype=torch.int32)
    w = torch.full((n, k), -128, dtype=torch.int8)
    ones = torch.ones(4), torch.ones(n)
    out = int8_linear(x_q, ones[0], zp, w, ones[1], backend="cpu")
    assert torch.equal(out, torch.full((1, 4, n), -255.0 * 128 * k))


@native
def test_quantize_per_token_is_bit_identical_to_twin():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 10, 37, generator=g) * 4
    scale = torch.rand(10, generator=g) * 0.05 + 0.01
    zp = torch.randint(0, 256, (10,), dtype=torch.int32, generator=g)
    # exact halves: round half to even
    x[0, 0, :8] = (torch.arange(8) + 0.5) * scale[0]
    x[1, 1, :4] = torch.tensor([1e30, -1e30, 3e7, -3e7])  # beyond the exact-rounding range: clamped
    x[2, 1, :4] = torch.tensor([-5e6, 5e6, 7.5, 0.0]) * scale[1]
    for bits in (8, 6, 4):
        assert torch.equal(quantize_per_token(x, scale, zp % (1 << bits), bits, backend="cpu"),
                           quantize_per_token_ref(x, scale, zp % (1 << bits), bits))
    # zero points far outside the code range (still exact up to 2^21), and refused beyond
    big = torch.full((10,), 2 ** 21 - 1, dtype=torch.int32)
    for z in (big, -big):
        assert torch.equal(quantize_per_token(x, scale, z, 8, backend="cpu"), quantize_per_token_ref(x, scale, z, 8))
    with pytest.raises(RuntimeError, match="zero points must lie within"):
        quantize_per_token(x, scale, big + 1, 8, backend="cpu")


def test_range_to_qparams_is_the_quantizers_arithmetic():
    from vmq.quant import quantizers

    g = torch.Generator().manual_seed(8)
    lo, hi = torch.randn(3, 17, generator=g) * 4, torch.randn(3, 17, generator=g) * 4
    lo[0, :3], hi[0, :3] = 0.0, 0.0  # empty range: scale eps
    for bits in (8, 4, 2):
        for got, want in zip(range_to_qparams(lo, hi, bits), quantizers.range_to_qparams(lo, hi, bits)):
            assert torch.equal(got, want)


@native
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 5, 7, 3), (3, 65, 96, 384), (2, 9, 6, 192), (1, 7, 33, 17),
                                   (2, 3, 0, 4)])
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("smooth", [False, True])
@pytest.mark.parametrize("bits", [8, 4])
def test_int8_linear_from_float_is_bit_identical_to_twin(shape, per_row, smooth, bits):
    batch, tokens, k, n = shape
    _, xs, zp, w, ws, bias, _, _ = _linear_inputs(*shape, per_row=per_row)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(batch, tokens, k, generator=g) * 3
    zp = zp % (1 << bits)
    s = torch.rand(k, generator=g) + 0.5 if smooth else None
    if k >= 8:  # exact halves after smoothing: round half to even
        x[0, 0, :8] = (torch.arange(8) + 0.5) * xs.reshape(-1)[0] * (s[:8] if smooth else 1)
    ref = int8_linear_from_float_ref(x, s, xs, zp, bits, w, ws, bias)
    out = int8_linear_from_float(x, s, xs, zp, bits, w, ws, bias, backend="cpu")
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.equal(out, ref)
    # the two-step path it replaces
    two_step = int8_linear(quantize_per_token(x / s if smooth else x, xs, zp, bits, backend="cpu"), xs, zp, w, ws, bias,
                           backend="cpu")
    assert torch.equal(out, two_step)


@native
def test_int8_linear_rejects_bad_inputs():
    x_q, xs, zp, w, ws, bias, _, _ = _linear_inputs(1, 4, 8, 5)
    with pytest.raises(RuntimeError, match="in_features"):
        torch.ops.vmq.int8_linear(x_q, xs, zp, w[:, :7].contiguous(), ws, bias, None, None, 8)
    with pytest.raises(RuntimeError, match="x_scale"):
        torch.ops.vmq.int8_linear(x_q, xs[:3], zp, w, ws, bias, None, None, 8)
    with pytest.raises(RuntimeError, match="out_bits"):
        torch.ops.vmq.int8_linear(x_q, xs, zp, w, ws, bias, xs, zp, 9)


@native
@pytest.mark.parametrize("shape", [(1, 1, 2, 1), (2, 5, 6, 3), (3, 65, 96, 38), (1, 13, 192, 384)])
def test_w4a8_linear_is_bit_identical_to_twin(shape):
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(*shape)
    w4 = torch.clamp(w, -8, 7)
    packed = pack_int4(w4)
    assert packed.shape == (w.shape[0], w.shape[1] // 2) and torch.equal(unpack_int4_ref(packed), w4)
    ref = w4a8_linear_ref(x_q, xs, zp, packed, ws, bias)
    assert torch.equal(ref, int8_linear_ref(x_q, xs, zp, w4, ws, bias))
    assert torch.equal(w4a8_linear(x_q, xs, zp, packed, ws, bias, backend="cpu"), ref)
    out = w4a8_linear(x_q, xs, zp, packed, ws, bias, os_, oz, 8, backend="cpu")
    assert torch.equal(out, w4a8_linear_ref(x_q, xs, zp, packed, ws, bias, os_, oz, 8))
    with pytest.raises(ValueError, match="K even"):
        pack_int4(w4[:, :1] if w4.shape[1] > 1 else torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("shape", [(1, 2), (5, 6), (38, 96), (3, 0)])
def test_pack_int4_bytes_are_those_of_pack_bits(shape):
    """Value k of a row in byte k // 2, low nibble first, 4-bit two's complement: vmq.pack.bits' format."""
    w = torch.randint(-8, 8, shape, dtype=torch.int8, generator=torch.Generator().manual_seed(shape[0]))
    packed = pack_int4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (shape[0], shape[1] // 2) and packed.is_contiguous()
    assert torch.equal(packed.reshape(-1), pack_signed(w, 4))
    assert torch.equal(unpack_int4_ref(packed), w)
    with pytest.raises(ValueError, match="4-bit range"):
        pack_int4(torch.full((1, 2), 8, dtype=torch.int8))


def _vq_inputs(tokens, k, n, d, size, rows_per_group, scale=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    cols = -(-k // d)
    groups = -(-n // rows_per_group)
    x = torch.randn(2, tokens, k, generator=g)
    codes = torch.randint(0, size, (n, cols), dtype=torch.int32, generator=g)
    codebook = torch.randn(groups, size, d, generator=g).half()
    s = (torch.rand(n, generator=g) + 0.5).half() if scale else None
    return x, codes, codebook, rows_per_group, s, torch.randn(n, generator=g)


@native
@pytest.mark.parametrize("case", [(5, 16, 8, 4, 16, 8), (7, 30, 13, 4, 4, 5), (65, 192, 384, 8, 256, 384),
                                  (3, 6, 9, 2, 2, 9)])
@pytest.mark.parametrize("scale", [True, False])
def test_vq_linear_matches_twin(case, scale):
    x, codes, cb, rpg, s, bias = _vq_inputs(*case, scale=scale)
    ref = vq_linear_ref(x, codes, cb, rpg, s, bias)
    torch.testing.assert_close(vq_linear(x, codes, cb, rpg, s, bias, backend="cpu"), ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(vq_linear(x, codes, cb, rpg, s, None, backend="cpu"),
                               vq_linear_ref(x, codes, cb, rpg, s), rtol=1e-5, atol=1e-4)
    bad = codes.clone()
    bad[0, 0] = cb.shape[1]
    with pytest.raises(RuntimeError, match="codewords"):
        torch.ops.vmq.vq_linear(x, bad, cb, rpg, s, bias)


def _conv_inputs(b, d, l, k, seed=0, token_major=True, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, d, generator=g).transpose(1, 2) if token_major else torch.randn(b, d, l, generator=g)
    w, w_b = torch.randn(d, k, generator=g), torch.randn(d, k, generator=g)
    bs = (torch.randn(d, generator=g), torch.randn(d, generator=g)) if bias else (None, None)
    return x, w, bs[0], w_b, bs[1]


@native
@pytest.mark.parametrize("shape", [(2, 19, 13, 4), (1, 8, 1, 4), (3, 40, 30, 3), (2, 16, 2, 4), (1, 5, 7, 1),
                                   (2, 192, 65, 4)])
@pytest.mark.parametrize("token_major", [True, False])
@pytest.mark.parametrize("bias", [True, False])
def test_bidirectional_conv1d_silu_matches_twin(shape, token_major, bias):
    args = _conv_inputs(*shape, token_major=token_major, bias=bias)
    u, u_b = bidirectional_conv1d_silu(*args, backend="cpu")
    ref, ref_b = bidirectional_conv1d_silu_ref(*args)
    for out, want in ((u, ref), (u_b, ref_b)):
        assert out.shape == want.shape and out.dtype == torch.float32
        assert out.transpose(1, 2).is_contiguous()  # token-major storage
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_bidirectional_conv1d_silu_ref_is_the_official_flip_conv_flip():
    x, w, bias, w_b, bias_b = _conv_inputs(2, 6, 9, 4, seed=3, token_major=False)
    conv = torch.nn.Conv1d(6, 6, 4, groups=6, padding=3)
    with torch.no_grad():
        conv.weight.copy_(w_b[:, None])
        conv.bias.copy_(bias_b)
        want = F.silu(conv(x.flip(-1))[..., :9]).flip(-1)
    _, u_b = bidirectional_conv1d_silu_ref(x, w, bias, w_b, bias_b)
    torch.testing.assert_close(u_b, want)


@native
def test_bidirectional_conv1d_silu_falls_back_for_gradients_and_checks_shapes():
    x, w, bias, w_b, bias_b = _conv_inputs(1, 8, 5, 4)
    w.requires_grad_(True)
    u, _ = bidirectional_conv1d_silu(x, w, bias, w_b, bias_b)  # auto: the differentiable twin
    assert u.requires_grad
    with pytest.raises(VmqError, match="without gradients"):
        bidirectional_conv1d_silu(x, w, bias, w_b, bias_b, backend="cpu")
    with pytest.raises(RuntimeError, match="weight_b must be float32"):
        torch.ops.vmq.bidirectional_conv1d_silu(x, w.detach(), bias, w_b[:4], bias_b)


@native
@pytest.mark.parametrize("shape", [(2, 65, 96), (3, 7, 17), (1, 192), (4, 0, 8), (5, 1)])
def test_rms_norm_matches_twin(shape):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(*shape, generator=g) * 3
    w = torch.randn(shape[-1], generator=g)
    out = rms_norm(x, w, 1e-5, backend="cpu")
    assert out.shape == x.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, rms_norm_ref(x, w, 1e-5), rtol=2e-6, atol=1e-6)
    w.requires_grad_(True)
    assert rms_norm(x, w, 1e-5).requires_grad  # auto: the differentiable twin
    with pytest.raises(RuntimeError, match="weight must be float32"):
        torch.ops.vmq.rms_norm(x, w.detach()[:-1] if shape[-1] > 1 else w.detach().double(), 1e-5)


def _opcheck_op(case):
    """The op of an _opcheck_cases entry (variants end in _requant or _w_sum)."""
    return case.replace("_requant", "").replace("_w_sum", "")


def _opcheck_cases():
    scan = _scan_inputs(2, 12, 5, 4)
    lin = _linear_inputs(2, 3, 10, 7)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 3, generator=g)
    c = torch.randn(6, 3, generator=g)
    u, delta = torch.randn(2, 4, 5, generator=g), torch.randn(2, 4, 5, generator=g).abs()
    A, B, C = -torch.rand(4, 3, generator=g), torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    return {
        "bidirectional_scan": (*scan[:13], None, None, None, None, True, True),
        "multi_scan": tuple(_multi_scan_inputs("local", 2, 12, 4, layout="mixed", shared_u=True, merge="none")),
        "bidirectional_conv1d_silu": _conv_inputs(2, 12, 5, 4),
        "rms_norm": (torch.randn(2, 5, 24, generator=g), torch.randn(24, generator=g), 1e-5),
        "int8_linear": (*lin[:6], None, None, 8),
        "int8_linear_requant": (*lin, 8),
        "int8_linear_w_sum": (*lin, 8, lin[3].sum(1, dtype=torch.int32)),
        "int8_linear_from_float": (torch.randn(2, 3, 10, generator=g), torch.rand(10, generator=g) + 0.5, lin[1],
                                   lin[2], 8, lin[3], lin[4], lin[5]),
        "w4a8_linear": (*lin[:3], pack_int4(torch.clamp(lin[3], -8, 7)[:, :10]), *lin[4:], 8),
        "w4a8_linear_w_sum": (*lin[:3], pack_int4(torch.clamp(lin[3], -8, 7)), *lin[4:], 8,
                              torch.clamp(lin[3], -8, 7).sum(1, dtype=torch.int32)),
        "vq_linear": _vq_inputs(3, 10, 7, 4, 8, 4),
        "quantize_per_token": (torch.randn(2, 3, 10, generator=g), lin[1], lin[2], 8),
        "kmeans_assign": (x, None, c),
        "kmeans_update": (x, torch.rand(50, 3, generator=g), torch.randint(0, 6, (50,), generator=g), c),
        "scan_train_fwd": (u, delta, A, B, C),
        "scan_train_bwd": (u, delta, A, B, C, torch.randn(2, 4, 5, generator=g)),
    }


@native
@pytest.mark.parametrize("case", sorted(_opcheck_cases()))
def test_opcheck(case):
    op = getattr(torch.ops.vmq, _opcheck_op(case))
    torch.library.opcheck(op, _opcheck_cases()[case])


def test_backend_choice_and_errors():
    x = torch.zeros(2, 3, 4, dtype=torch.uint8)
    assert use_native("int8_linear", x, "ref") is False
    with pytest.raises(ValueError, match="backend must be one of"):
        use_native("int8_linear", x, "gpu")
    with pytest.raises(VmqError, match="tensors are on cpu"):
        use_native("int8_linear", x, "cuda")
    if _library.NATIVE is None:
        with pytest.raises(VmqError, match="pip install --no-build-isolation"):
            use_native("int8_linear", x, "cpu")
    else:
        assert use_native("int8_linear", x, "auto") is True
        assert use_native("int8_linear", x, "auto", takes=False) is False
        with pytest.raises(VmqError, match="takes uint8"):
            use_native("int8_linear", x, "cpu", takes=False, why="takes uint8 activations")


@native
def test_model_forward_same_on_every_cpu_backend():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    x = torch.randn(2, 3, model.cfg.img_size, model.cfg.img_size)
    out = {}
    with torch.no_grad():
        for b in ("ref", "cpu", "auto"):
            with use_backend(b):
                out[b] = model(x)
    torch.testing.assert_close(out["cpu"], out["ref"], rtol=1e-4, atol=1e-5)
    assert torch.equal(out["auto"], out["cpu"])
    # with gradients the model falls back to the differentiable reference under "auto"
    assert model(x).requires_grad
    with use_backend("cpu"), pytest.raises(VmqError, match="without gradients"):
        model(x)


# ---- per-token parameters: one contract for the twins and the kernels ---------------------------

def _mixed_kind_calls(lin):
    """(label, call) for every mix of per-token kinds; each must be refused by twin and kernel alike."""
    x_q, xs, zp, w, ws, bias, os_, oz = lin  # per row: (batch, tokens)
    t = x_q.shape[1]
    flat = lambda p: p.reshape(-1)  # noqa: E731  ((batch * tokens,): neither (tokens,) nor (batch, tokens))
    return [
        ("out_zero_point per token, out_scale per row", (x_q, xs, zp, w, ws, bias, os_, oz[0], 8)),
        ("out_scale per token, out_zero_point per row", (x_q, xs, zp, w, ws, bias, os_[0], oz, 8)),
        ("out params per token, x params per row", (x_q, xs, zp, w, ws, bias, os_[0], oz[0], 8)),
        ("x_zero_point per token, x_scale per row", (x_q, xs, zp[0], w, ws, bias, None, None, 8)),
        ("flattened x_scale", (x_q, flat(xs), flat(zp), w, ws, bias, None, None, 8)),
        ("flattened out params", (x_q, xs, zp, w, ws, bias, flat(os_), flat(oz), 8)),
        ("x params of another length", (x_q, xs[:, :t - 1], zp[:, :t - 1], w, ws, bias, None, None, 8)),
    ]


@native
def test_int_linear_refuses_mixed_per_token_kinds_like_its_twin():
    """Scales and zero points all (tokens,) or all x.shape[:-1]: the kernels index every one of them
    with one row index, so a mix the twin used to broadcast read past out_zero_point's end."""
    lin = _linear_inputs(2, 5, 32, 16, seed=3, per_row=True)
    w4 = pack_int4(torch.clamp(lin[3], -8, 7))
    for label, args in _mixed_kind_calls(lin):
        with pytest.raises(ValueError, match="per-token parameters"):
            int8_linear_ref(*args)
        with pytest.raises(RuntimeError, match="x_scale|x_zero_point|out_scale|out_zero_point"):
            torch.ops.vmq.int8_linear(*args)
        with pytest.raises(ValueError, match="per-token parameters"):  # the wrapper says what the twin says
            int8_linear(*args, backend="cpu")
        packed = (*args[:3], w4, *args[4:])
        with pytest.raises(ValueError, match="per-token parameters"):
            w4a8_linear_ref(*packed)
        with pytest.raises(RuntimeError, match="x_scale|x_zero_point|out_scale|out_zero_point"):
            torch.ops.vmq.w4a8_linear(*packed)
    # batch 1: (tokens,) and (1, tokens) are both per token; mixing them is fine for all
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(1, 5, 32, 16, seed=4)
    args = (x_q, xs, zp[None], w, ws, bias, os_[None], oz, 8)
    assert torch.equal(int8_linear(*args, backend="cpu"), int8_linear_ref(*args))


@native
def test_quantize_per_token_refuses_what_its_twin_refuses():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 5, 12, generator=g)
    s, z = torch.rand(2, 5, generator=g) + 0.1, torch.randint(0, 256, (2, 5), dtype=torch.int32, generator=g)
    for label, (ss, zz) in {"flattened": (s.reshape(-1), z.reshape(-1)), "mixed kinds": (s, z[0]),
                            "other length": (s[:, :4], z[:, :4])}.items():
        with pytest.raises(ValueError, match="per-token parameters"):
            quantize_per_token_ref(x, ss, zz)
        with pytest.raises(RuntimeError, match="scale|zero_point"):
            torch.ops.vmq.quantize_per_token(x, ss, zz, 8)
        with pytest.raises(ValueError, match="per-token parameters"):
            quantize_per_token(x, ss, zz, backend="cpu")
    assert torch.equal(quantize_per_token(x, s, z, backend="cpu"), quantize_per_token_ref(x, s, z))


# ---- the weights' row sums, given once --------------------------------------------------------

@native
@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 65, 96, 38), (1, 13, 192, 384)])
def test_int_linear_with_cached_w_sum_is_identical(shape):
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(*shape)
    w_sum = w.sum(1, dtype=torch.int32)
    for tail in ((None, None, 8), (os_, oz, 8), (os_, oz % 16, 4)):
        ref = int8_linear_ref(x_q, xs, zp, w, ws, bias, *tail)
        assert torch.equal(int8_linear_ref(x_q, xs, zp, w, ws, bias, *tail, w_sum), ref)
        assert torch.equal(int8_linear(x_q, xs, zp, w, ws, bias, *tail, w_sum=w_sum, backend="cpu"), ref)
        assert torch.equal(torch.ops.vmq.int8_linear(x_q, xs, zp, w, ws, bias, *tail, w_sum), ref)
    if shape[2] % 2 == 0:
        w4 = torch.clamp(w, -8, 7)
        packed, w4_sum = pack_int4(w4), w4.sum(1, dtype=torch.int32)
        ref = w4a8_linear_ref(x_q, xs, zp, packed, ws, bias)
        assert torch.equal(w4a8_linear_ref(x_q, xs, zp, packed, ws, bias, w_sum=w4_sum), ref)
        assert torch.equal(w4a8_linear(x_q, xs, zp, packed, ws, bias, w_sum=w4_sum, backend="cpu"), ref)
    # the sums are used as given (what a layer caches must be right): a wrong one shows, the same in both
    off = w_sum + 1
    want = int8_linear_ref(x_q, xs, zp, w, ws, bias, w_sum=off)
    assert torch.equal(torch.ops.vmq.int8_linear(x_q, xs, zp, w, ws, bias, None, None, 8, off), want)
    assert not torch.equal(want, int8_linear_ref(x_q, xs, zp, w, ws, bias)) or not zp.any()


@native
def test_int_linear_refuses_a_bad_w_sum():
    x_q, xs, zp, w, ws, bias, _, _ = _linear_inputs(1, 4, 8, 5)
    for bad in (w.sum(1), w.sum(1, dtype=torch.int32)[:4], w.sum(1, dtype=torch.int32)[None]):
        with pytest.raises(ValueError, match="w_sum must be"):
            int8_linear_ref(x_q, xs, zp, w, ws, bias, w_sum=bad)
        with pytest.raises(RuntimeError, match="w_sum must be"):
            torch.ops.vmq.int8_linear(x_q, xs, zp, w, ws, bias, None, None, 8, bad)


@native
def test_quantized_linear_caches_its_row_sums_outside_its_state():
    g = torch.Generator().manual_seed(9)
    w = torch.randint(-127, 128, (24, 40), dtype=torch.int8, generator=g)
    layer = QuantizedLinear(w, torch.rand(24, generator=g) * 0.01, 8, "channel", 8, "token_dynamic")
    x = torch.randn(2, 7, 40, generator=g)
    with use_backend("cpu"):
        first = layer(x)
        cached = layer.kernels._w_sum[1]
        assert torch.equal(cached, w.sum(1, dtype=torch.int32)) and torch.equal(layer(x), first)
        assert layer.kernels._w_sum[1] is cached  # reused while the weight is unchanged
        layer.weight[0, 0] = 0  # in place, a new version: summed again
        assert torch.equal(layer(x)[..., 1:], first[..., 1:])
        assert torch.equal(layer.kernels._w_sum[1], layer.weight.sum(1, dtype=torch.int32))
        layer.weight = layer.weight.clone()  # another tensor (what .to(device) gives): summed again
        out = layer(x)
        assert layer.kernels._w_sum[1] is not cached
    with use_backend("ref"):  # the twin takes the cached sums too
        assert torch.equal(layer(x), out)
    assert not any("sum" in k for k in layer.state_dict()) and not any("sum" in k for k in layer.packed_tensors())


def test_vq_linear_layer_checks_its_codes_once():
    codes = torch.randint(0, 16, (6, 4), dtype=torch.int32)
    codebook = torch.randn(1, 16, 4).half()
    bad = codes.clone()
    bad[2, 1] = 16
    with pytest.raises(ValueError, match="codewords"):
        VQLinear(bad, codebook, 16)
    with pytest.raises(ValueError, match="codewords"):
        VQLinear(-codes - 1, codebook, 16)
    layer = VQLinear(codes, codebook, 16)  # packed codes are log2(size) bits: always in range when loaded
    spec = layer.spec()
    again = VQLinear.from_packed(spec, dict(layer.packed_tensors()), (6, 16))
    assert torch.equal(again.weight_codes, codes)
