"""The selective scan reference, the fused training scan held to it, and the one-direction scan choice."""

import numpy as np
import pytest
import torch

from vmq.errors import VmqError
from vmq.ops import _library
from vmq.ops.multi_scan import multi_direction_scan
from vmq.ops.scan import mamba_ssm_available, one_direction_scan, selective_scan_ref, two_direction_scan
from vmq.ops import scan_train
from vmq.ops.scan_train import (mamba_ssm_scan, scan_train_bwd_ref, scan_train_fwd_ref, selective_scan_fused,
                                training_scan)

native = pytest.mark.skipif(_library.NATIVE is None, reason=f"vmq._C is {_library.NATIVE_ERROR}")


def _inputs(b=2, e=3, l=6, n=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, e, l, generator=g, dtype=dtype)
    delta = torch.randn(b, e, l, generator=g, dtype=dtype)
    A = -torch.rand(e, n, generator=g, dtype=dtype) * 4
    B = torch.randn(b, n, l, generator=g, dtype=dtype)
    C = torch.randn(b, n, l, generator=g, dtype=dtype)
    D = torch.randn(e, generator=g, dtype=dtype)
    z = torch.randn(b, e, l, generator=g, dtype=dtype)
    return u, delta, A, B, C, D, z


def _numpy_scan(u, delta, A, B, C, D, z):
    """Independent scalar loops in numpy (float64)."""
    u, delta, A, B, C, D, z = (t.numpy().astype(np.float64) for t in (u, delta, A, B, C, D, z))
    delta = np.log1p(np.exp(delta))
    b_, e_, l_ = u.shape
    y = np.zeros_like(u)
    for b in range(b_):
        for e in range(e_):
            h = np.zeros(A.shape[1])
            for t in range(l_):
                h = np.exp(delta[b, e, t] * A[e]) * h + delta[b, e, t] * B[b, :, t] * u[b, e, t]
                y[b, e, t] = h @ C[b, :, t] + D[e] * u[b, e, t]
    return y * z / (1 + np.exp(-z))


def test_ref_matches_scalar_loops():
    args = _inputs()
    y = selective_scan_ref(*[a.float() for a in args], delta_softplus=True)
    np.testing.assert_allclose(y.double().numpy(), _numpy_scan(*args), atol=2e-5, rtol=1e-4)


def test_ref_is_causal():
    u, delta, A, B, C, D, z = [a.float() for a in _inputs(l=8)]
    y = selective_scan_ref(u, delta, A, B, C, D, z, delta_softplus=True)
    u2 = u.clone()
    u2[..., 5:] += 1.0
    y2 = selective_scan_ref(u2, delta, A, B, C, D, z, delta_softplus=True)
    torch.testing.assert_close(y[..., :5], y2[..., :5])
    assert not torch.allclose(y[..., 5:], y2[..., 5:])


def test_ref_rejects_bad_shapes():
    u, delta, A, B, C, D, z = [a.float() for a in _inputs()]
    with pytest.raises(ValueError, match="B must be"):
        selective_scan_ref(u, delta, A, B[:, :2], C)


@native
@pytest.mark.parametrize("n", [4, 16])
def test_fused_training_scan_matches_ref(n):
    args = [a.float().requires_grad_() for a in _inputs(b=3, e=5, l=9, n=n, seed=1)]
    y_ref = selective_scan_ref(*args, delta_softplus=True)
    y = selective_scan_fused(*args, delta_softplus=True)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    gy = torch.randn_like(y)
    g_ref = torch.autograd.grad(y_ref, args, gy)
    g = torch.autograd.grad(y, args, gy)
    for name, a, b in zip(["u", "delta", "A", "B", "C", "D", "z"], g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def _train_inputs(b=3, e=5, l=9, n=4, seed=2):
    """scan_train_* arguments: delta already positive, B and C token-major (batch, seqlen, d_state)."""
    u, delta, A, B, C, _, _ = (a.float() for a in _inputs(b, e, l, n, seed))
    return u, delta.abs(), A, B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()


def test_scan_train_bwd_ref_is_the_autograd_of_the_fwd_twin():
    args = _train_inputs(n=6)
    inputs = [a.clone().requires_grad_() for a in args]
    y = scan_train_fwd_ref(*inputs)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    for name, want, got in zip("u delta A B C".split(), torch.autograd.grad(y, inputs, gy),
                                scan_train_bwd_ref(*args, gy)):
        assert got.shape == want.shape and got.dtype == want.dtype
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


@native
@pytest.mark.parametrize("n, l", [(1, 9), (4, 9), (16, 9), (17, 9), (16, 1), (16, 40), (64, 20)])
def test_scan_train_kernels_match_twins(n, l):
    """The CPU kernels, i.e. the step arithmetic of csrc/cuda/scan_train_step.h they share with the CUDA
    kernels, on both of its loop forms (d_state 16 fixed, any other count)."""
    args = _train_inputs(l=l, n=n)
    y = torch.ops.vmq.scan_train_fwd(*args)
    torch.testing.assert_close(y, scan_train_fwd_ref(*args), atol=1e-5, rtol=1e-5)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
    for name, got, want in zip("u delta A B C".split(), torch.ops.vmq.scan_train_bwd(*args, gy),
                                scan_train_bwd_ref(*args, gy)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_training_scan_per_device():
    fused_cpu, fused_cuda = scan_train.available("cpu"), scan_train.available("cuda")
    assert training_scan() is training_scan("cpu") is training_scan(torch.device("cpu"))
    assert training_scan("cpu") is (selective_scan_fused if fused_cpu else selective_scan_ref)
    fallback = mamba_ssm_scan() or selective_scan_ref
    assert training_scan("cuda") is (selective_scan_fused if fused_cuda else fallback)


def test_training_scan_cuda_choice(monkeypatch):
    """CUDA: the fused scan with vmq._C's CUDA kernels, else mamba-ssm's scan when it imports, else the reference."""
    def mamba_scan(*args, **kw):
        raise AssertionError("not to be called")

    monkeypatch.setattr(scan_train, "available", lambda device="cpu": True)
    assert training_scan("cuda") is selective_scan_fused
    monkeypatch.setattr(scan_train, "available", lambda device="cpu": torch.device(device).type == "cpu")
    monkeypatch.setattr(scan_train, "mamba_ssm_scan", lambda: mamba_scan)
    monkeypatch.setattr(scan_train, "mamba_ssm_available", lambda: True)
    assert training_scan("cuda") is mamba_scan
    assert training_scan("cpu") is selective_scan_fused  # never mamba-ssm's on a CPU
    monkeypatch.setattr(scan_train, "mamba_ssm_scan", lambda: None)
    monkeypatch.setattr(scan_train, "mamba_ssm_available", lambda: False)
    assert training_scan("cuda") is selective_scan_ref


def test_one_direction_scan_by_name():
    assert one_direction_scan("reference", "cpu") is selective_scan_ref
    assert one_direction_scan("train", "cpu") is training_scan("cpu")
    assert one_direction_scan("train", "cuda") is training_scan("cuda")
    if mamba_ssm_available():
        assert callable(one_direction_scan("mamba_ssm", "cuda"))
    else:
        with pytest.raises(VmqError, match="mamba-ssm"):
            one_direction_scan("mamba_ssm", "cuda")
    with pytest.raises(ValueError, match="reference, train, mamba_ssm"):
        one_direction_scan("fused", "cpu")


def test_bidirectional_matches_official_composition():
    """out = (gate(scan_f) + flip(gate(scan_b on flipped inputs))) / 2, as the official mixer does."""
    f = [a.float() for a in _inputs(seed=3)]
    b = [a.float() for a in _inputs(seed=4)]
    u, delta, A, B, C, D, z = f
    u_b, delta_b, A_b, B_b, C_b, D_b, _ = b
    y_f = selective_scan_ref(u, delta, A, B, C, D, z, delta_softplus=True)
    y_b = selective_scan_ref(u_b.flip(-1), delta_b.flip(-1), A_b, B_b.flip(-1), C_b.flip(-1), D_b, z.flip(-1),
                             delta_softplus=True).flip(-1)
    got = two_direction_scan(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_softplus=True)
    torch.testing.assert_close(got, (y_f + y_b) / 2)
    nodiv = two_direction_scan(u, delta, A, B, C, D, u_b, delta_b, A_b, B_b, C_b, D_b, z, delta_softplus=True,
                               divide_out=False)
    torch.testing.assert_close(nodiv, y_f + y_b)


def _mamba_ssm_signature(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                         return_last_state=False):
    """A scan with mamba-ssm's ``selective_scan_fn`` signature (8th positional: delta_bias)."""
    if delta_bias is not None:
        delta = delta + delta_bias[None, :, None]
    return selective_scan_ref(u, delta, A, B, C, D, z, delta_softplus)


def test_one_direction_scans_are_called_by_keyword():
    # the compositions must pass z and delta_softplus by name: mamba-ssm's 8th argument is delta_bias
    g = torch.Generator().manual_seed(5)
    b, d, n, l = 2, 6, 4, 9
    u, delta, z = (torch.randn(b, d, l, generator=g) for _ in range(3))
    A, D = -torch.rand(d, n, generator=g) - 0.5, torch.randn(d, generator=g)
    B, C = torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)
    args = (u, delta, A, B, C, D, u, delta, A, B, C, D, z, True, True)
    ref = two_direction_scan(*args, scan=selective_scan_ref)
    assert torch.allclose(two_direction_scan(*args, scan=_mamba_ssm_signature), ref)
    out_index = torch.arange(l).unsqueeze(0)
    m_args = ([u], [delta], A[None], [B], [C], D[None], None, z, None, out_index, l, True, "sum")
    assert torch.allclose(multi_direction_scan(*m_args, scan=_mamba_ssm_signature),
                          multi_direction_scan(*m_args, scan=selective_scan_ref))
