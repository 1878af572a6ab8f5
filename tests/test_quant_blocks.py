"""PTQ building blocks: quantizers, truncation, smoothing, integer linear reference, bit packing."""

import pytest
import torch

from vmq.errors import VmqError
from vmq.layers import QuantizedLinear
from vmq.ops.backend import use_backend
from vmq.ops.linear import int8_linear_ref, int8_matmul_ref
from vmq.ops.quantize import dequantize_per_token_ref, quantize_per_token_ref
from vmq.pack.bits import pack_signed, packed_nbytes, unpack_signed
from vmq.quant.quantizers import ActQuantizer, WeightQuantizer, fake_quant, range_to_qparams
from vmq.quant.smooth import smoothing_scale
from vmq.quant.truncation import activation_range_search, weight_scale_search


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_pack_roundtrip(bits):
    g = torch.Generator().manual_seed(bits)
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    for n in (1, 7, 64, 1001):
        v = torch.randint(lo, hi + 1, (n,), generator=g)
        p = pack_signed(v, bits)
        assert p.dtype == torch.uint8 and p.numel() == packed_nbytes(n, bits)
        assert torch.equal(unpack_signed(p, bits, n), v.to(torch.int8))


def test_pack_layout_and_range():
    # 4-bit: value 0 in the low nibble of byte 0, value 1 in the high nibble
    assert pack_signed(torch.tensor([1, -1]), 4).tolist() == [0xF1]
    with pytest.raises(ValueError, match="outside the 4-bit range"):
        pack_signed(torch.tensor([8]), 4)
    with pytest.raises(ValueError, match="bits must be 2..8"):
        pack_signed(torch.tensor([0]), 9)


def test_weight_quantizer_integers_and_fake_quant_agree():
    w = torch.randn(16, 32)
    q = WeightQuantizer(16, 4).eval()
    with torch.no_grad():
        q.scale.copy_(weight_scale_search(w, 4))
    ints = q.integer(w)
    assert ints.abs().max() <= 7
    torch.testing.assert_close(q(w), ints.float() * q.scale)


def test_truncation_beats_minmax():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 256, generator=g)
    w[:, 0] = 12.0  # an outlier column
    minmax = w.abs().amax(1, keepdim=True) / 7
    best = weight_scale_search(w, 4, p=2.0)
    err = lambda s: ((torch.clamp(torch.round(w / s), -7, 7) * s - w) ** 2).sum()
    assert err(best) < err(minmax)
    x = torch.randn(64, 5, 8, generator=g) * torch.tensor([1.0, 2, 4, 8, 16]).view(1, 5, 1)
    lo, hi = activation_range_search(x, 4)
    assert lo.shape == (5,) and (hi - lo > 0).all()
    assert ((hi - lo)[1:] > (hi - lo)[:-1]).all()  # per-token ranges follow the per-token spread


def test_act_quantizer_per_token_static_and_token_check():
    q = ActQuantizer(8, "token_static", tokens=5)
    q.set_range(torch.full((5,), -1.0), torch.linspace(1, 5, 5))
    x = torch.randn(3, 5, 8)
    y = q.eval()(x).detach()
    scale, zp = q.scale[:, 0].detach(), q.zero_point[:, 0]
    lo, hi = (-zp * scale).view(1, 5, 1), ((255 - zp) * scale).view(1, 5, 1)
    assert ((y >= lo - 1e-6) & (y <= hi + 1e-6)).all()
    inside = (x >= lo) & (x <= hi)
    assert ((y - x).abs() <= scale.view(1, 5, 1) / 2 + 1e-6)[inside].all()
    assert ((y[:, 0] - x[:, 0]).abs() > 0.5).any()  # token 0 is clipped to about [-1, 1]
    with pytest.raises(VmqError, match="calibrated for 5 tokens got 6"):
        q(torch.randn(3, 6, 8))


def test_fake_quant_scale_gets_lsq_gradient():
    s = torch.tensor(0.1, requires_grad=True)
    x = torch.tensor([0.26, 10.0])
    fake_quant(x, s, None, -7, 7).sum().backward()
    # d/ds of s*round(x/s): round(x/s) - x/s inside the range, qmax when clipped
    assert s.grad.item() == pytest.approx((3 - 2.6) + 7, abs=1e-4)


def test_integer_linear_matches_fake_quant():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 24, generator=g) * 3
    w = torch.randn(10, 24, generator=g)
    bias = torch.randn(10, generator=g)
    lo, hi = activation_range_search(x, 8)
    scale, zp = range_to_qparams(lo, hi, 8)
    w_scale = weight_scale_search(w, 8).reshape(-1)
    w_q = torch.clamp(torch.round(w / w_scale[:, None]), -127, 127).to(torch.int8)
    x_q = quantize_per_token_ref(x, scale, zp)
    y_int = int8_linear_ref(x_q, scale, zp, w_q, w_scale, bias)
    x_fq = fake_quant(x, scale[:, None], zp[:, None], 0, 255)
    w_fq = fake_quant(w, w_scale[:, None], None, -127, 127)
    torch.testing.assert_close(y_int, x_fq @ w_fq.t() + bias, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(dequantize_per_token_ref(x_q, scale, zp), x_fq)


def test_int8_matmul_is_exact():
    x_q = torch.full((1, 3072), 255, dtype=torch.uint8)
    w_q = torch.full((2, 3072), -127, dtype=torch.int8)
    acc = int8_matmul_ref(x_q, torch.zeros(1), w_q)
    assert acc.dtype == torch.int32 and acc[0, 0].item() == 255 * -127 * 3072


def test_smoothing_scale():
    act = torch.tensor([1.0, 100.0])
    w = torch.tensor([[1.0, 1.0], [0.5, 0.01]])
    s = smoothing_scale(act, w, alpha=0.5)
    torch.testing.assert_close(s, torch.tensor([1.0, 10.0]))
    x = torch.randn(4, 2) * act
    torch.testing.assert_close((x / s) @ (w * s).t(), x @ w.t(), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError):
        smoothing_scale(act, w, alpha=1.5)


@pytest.mark.parametrize("w_bits,a_strategy,w_strategy", [(8, "token_static", "channel"), (6, "token_static", "channel"),
                                                      (4, "token_static", "channel"), (4, "tensor_static", "tensor"),
                                                      (8, "token_dynamic", "channel")])
def test_quant_linear_fake_and_integer_agree(w_bits, a_strategy, w_strategy):
    from vmq.quant.qlinear import QuantLinear

    g = torch.Generator().manual_seed(w_bits)
    lin = torch.nn.Linear(24, 12)
    x = torch.randn(3, 5, 24, generator=g) * torch.linspace(0.1, 5, 24)
    q = QuantLinear(lin, w_bits, 8, a_strategy, tokens=5, w_strategy=w_strategy).eval()
    with torch.no_grad():
        q.set_smoothing(smoothing_scale(x.abs().amax(dim=(0, 1)), lin.weight, 0.5))
        ws = q.smoothed_weight()
        q.w_quant.scale.copy_(weight_scale_search(ws if w_strategy == "channel" else ws.reshape(1, -1), w_bits))
        if a_strategy != "token_dynamic":
            q.a_quant.set_range(*activation_range_search(x / q.smooth, 8, per_token=a_strategy == "token_static"))
        fake = q(x)
        frozen = q.freeze()
        integer = frozen(x)  # "auto": the compiled kernels where built (static scales: the fused float-input one)
        with use_backend("ref"):
            assert torch.equal(frozen(x), integer)  # the integer path is bit-identical on every backend
    assert isinstance(frozen, QuantizedLinear) and frozen.weight.dtype == torch.int8
    assert frozen.weight.abs().max() <= 2 ** (w_bits - 1) - 1
    torch.testing.assert_close(integer, fake, atol=1e-4, rtol=1e-5)
    rel = (fake - lin(x)).norm() / lin(x).norm()
    assert rel < {8: 0.02, 6: 0.05, 4: 0.2}[w_bits]


def test_quantized_linear_cached_kernel_arguments_follow_buffer_changes():
    from vmq.quant.qlinear import QuantLinear

    torch.manual_seed(3)
    g = torch.Generator().manual_seed(3)
    lin = torch.nn.Linear(16, 8)
    q = QuantLinear(lin, 8, 8, "token_static", tokens=5).eval()
    x = torch.randn(2, 5, 16, generator=g)
    with torch.no_grad():
        q.w_quant.scale.copy_(weight_scale_search(lin.weight, 8))
        q.a_quant.set_range(*activation_range_search(x, 8, per_token=True))
        frozen = q.freeze()
        first = frozen(x)
        for change in (lambda: frozen.input_scale.mul_(2.0), lambda: frozen.weight_scale.mul_(0.5),
                       lambda: setattr(frozen, "bias", torch.ones(8))):
            change()
            out = frozen(x)  # "auto"
            with use_backend("ref"):
                ref = frozen(x)
            assert torch.equal(out, ref) and not torch.equal(out, first)
            first = out


def test_quantized_linear_refuses_other_token_count():
    from vmq.quant.qlinear import QuantLinear

    q = QuantLinear(torch.nn.Linear(8, 4), 8, 8, "token_static", tokens=5)
    q.a_quant.set_range(torch.full((5,), -1.0), torch.ones(5))
    frozen = q.freeze()
    with pytest.raises(VmqError, match="calibrated for 5 tokens"):
        frozen(torch.randn(2, 6, 8))


def test_activation_range_search_chunking_does_not_change_the_result():
    torch.manual_seed(1)
    x = torch.randn(6, 9, 20) * torch.rand(9, 1) * 3 + 0.5
    whole = activation_range_search(x, 6, chunk_values=1 << 20)
    for chunk in (1, 100, 250):
        lo, hi = activation_range_search(x, 6, chunk_values=chunk)
        assert torch.equal(lo, whole[0]) and torch.equal(hi, whole[1])
