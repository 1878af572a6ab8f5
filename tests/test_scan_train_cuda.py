"""The CUDA training scan (vmq::scan_train_fwd / scan_train_bwd) held to its twins (marker ``gpu``).

The forward and all five gradients are compared elementwise with the twins (run on the same
GPU) to fp32 rounding: the kernel's __expf and its summation orders. Outputs the kernels leave
unwritten would show: the blocks the outputs are allocated from are filled with NaN first.
"""

import pytest
import torch

from vmq.ops import _library
from vmq.ops.scan_ref import selective_scan_ref
from vmq.ops.scan_train import (available, scan_train_bwd_ref, scan_train_fwd_ref, selective_scan_fused,
                                training_scan)

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(_library.NATIVE is None or not getattr(_library.NATIVE, "cuda_built", False),
                                 reason="vmq._C was built without CUDA kernels"),
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

NAMES = ("u", "delta", "A", "B", "C")
# (batch, d_inner, seqlen, d_state): tails of the 16-token chunks and of the 64-channel blocks,
# every state-count template (<= 4, <= 16, <= 64) with partly used state groups
SHAPES = [(1, 1, 1, 1), (2, 130, 31, 16), (3, 130, 33, 17), (2, 384, 197, 16), (1, 130, 1000, 16),
          (2, 1, 197, 64), (3, 384, 33, 64), (1, 384, 1000, 1), (3, 1, 1000, 17), (2, 130, 197, 4),
          (3, 65, 16, 3)]
EMPTY = [(2, 3, 0, 16), (0, 5, 7, 16), (2, 0, 5, 4)]


def _inputs(b, e, l, n, seed=0):
    """scan_train_* arguments on the GPU (delta positive, B and C token-major) and a grad_y."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, e, l, generator=g)
    delta = torch.rand(b, e, l, generator=g) * 1.5 + 0.05
    A = -torch.rand(e, n, generator=g) * 8 - 0.1
    B = torch.randn(b, l, n, generator=g)
    C = torch.randn(b, l, n, generator=g)
    gy = torch.randn(b, e, l, generator=g)
    return [t.cuda() for t in (u, delta, A, B, C)], gy.cuda()


def _poison(*likes):
    """Fill blocks shaped like ``likes`` with NaN and free them: the caching allocator hands them
    to the next outputs."""
    blocks = [torch.full_like(t, float("nan")) for t in likes]
    del blocks


def _close(got, want, name):
    assert got.shape == want.shape and got.dtype == want.dtype and got.device == want.device, name
    scale = want.abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5 * scale + 1e-7, msg=lambda m: f"{name}: {m}")


def test_training_scan_on_cuda_is_the_fused_scan():
    assert available("cuda") and training_scan("cuda") is selective_scan_fused
    assert training_scan(torch.device("cuda", 0)) is selective_scan_fused


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_kernels_match_twins(shape):
    args, gy = _inputs(*shape)
    _poison(args[0])
    y = torch.ops.vmq.scan_train_fwd(*args)
    torch.cuda.synchronize()
    _close(y, scan_train_fwd_ref(*args), "y")
    _poison(*args, *args)
    grads = torch.ops.vmq.scan_train_bwd(*args, gy)
    torch.cuda.synchronize()
    for name, got, want in zip(NAMES, grads, scan_train_bwd_ref(*args, gy)):
        _close(got, want, f"grad {name}")


@pytest.mark.parametrize("shape", EMPTY, ids=lambda s: "x".join(map(str, s)))
def test_empty_shapes_match_the_cpu_kernel(shape):
    """No batch, channel or token: empty outputs, and zero gradients of A, B, C where those are not empty."""
    args, gy = _inputs(*shape)
    y = torch.ops.vmq.scan_train_fwd(*args)
    assert y.is_cuda and y.shape == args[0].shape
    cpu = [t.cpu() for t in args]
    for name, got, want in zip(NAMES, torch.ops.vmq.scan_train_bwd(*args, gy),
                                torch.ops.vmq.scan_train_bwd(*cpu, gy.cpu())):
        assert got.is_cuda and got.shape == want.shape, name
        assert torch.equal(got.cpu(), want), name


def test_backward_takes_a_non_contiguous_grad_y():
    args, gy = _inputs(2, 70, 40, 16, seed=1)
    gy_t = gy.transpose(1, 2).contiguous().transpose(1, 2)  # same values, (l, e) strides
    assert not gy_t.is_contiguous()
    for name, got, want in zip(NAMES, torch.ops.vmq.scan_train_bwd(*args, gy_t), scan_train_bwd_ref(*args, gy)):
        _close(got, want, f"grad {name}")


@pytest.mark.parametrize("shape", [(2, 130, 197, 16), (3, 64, 33, 1), (1, 20, 50, 24)],
                         ids=lambda s: "x".join(map(str, s)))
def test_differentiable_scan_matches_ref_under_autograd(shape):
    """training_scan("cuda") with D, z and softplus: output and the gradients of all seven inputs."""
    b, e, l, n = shape
    g = torch.Generator().manual_seed(3)
    u, delta, z = (torch.randn(b, e, l, generator=g) for _ in range(3))
    A = -torch.rand(e, n, generator=g) * 4
    B, C = torch.randn(b, n, l, generator=g), torch.randn(b, n, l, generator=g)
    D = torch.randn(e, generator=g)
    inputs = [t.cuda().requires_grad_() for t in (u, delta, A, B, C, D, z)]
    scan = training_scan("cuda")
    y = scan(*inputs, delta_softplus=True)
    y_ref = selective_scan_ref(*inputs, delta_softplus=True)
    _close(y, y_ref, "y")
    gy = torch.randn(y.shape, generator=g).cuda()
    grads = torch.autograd.grad(y, inputs, gy)
    grads_ref = torch.autograd.grad(y_ref, inputs, gy)
    for name, got, want in zip(("u", "delta", "A", "B", "C", "D", "z"), grads, grads_ref):
        _close(got, want, f"grad {name}")


def test_opcheck_cuda():
    from tests.test_kernels import _opcheck_cases

    cases = _opcheck_cases()
    for name in ("scan_train_fwd", "scan_train_bwd"):
        torch.library.opcheck(getattr(torch.ops.vmq, name), tuple(t.cuda() for t in cases[name]))


def test_non_default_stream():
    """The kernels run on the current stream: inputs written there just before are the ones read."""
    args, gy = _inputs(2, 130, 197, 16, seed=4)
    want_y, want_grads = scan_train_fwd_ref(*args), scan_train_bwd_ref(*args, gy)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        u = torch.full_like(args[0], float("nan"))
        busy = torch.randn(2048, 2048, device="cuda")
        for _ in range(20):  # keeps the side stream busy before u is written
            busy = torch.tanh(busy @ busy)
        u.copy_(args[0])
        y = torch.ops.vmq.scan_train_fwd(u, *args[1:])
        grads = torch.ops.vmq.scan_train_bwd(u, *args[1:], gy)
    side.synchronize()
    _close(y, want_y, "y")
    for name, got, want in zip(NAMES, grads, want_grads):
        _close(got, want, f"grad {name}")


def test_bad_inputs_are_clear_errors():
    args, gy = _inputs(2, 5, 7, 4)
    u, delta, A, B, C = args
    with pytest.raises(RuntimeError, match="d_state up to 64"):
        torch.ops.vmq.scan_train_fwd(u, delta, torch.zeros(5, 65, device="cuda"), torch.zeros(2, 7, 65, device="cuda"),
                                     torch.zeros(2, 7, 65, device="cuda"))
    with pytest.raises(RuntimeError, match="delta must be float32"):
        torch.ops.vmq.scan_train_fwd(u, delta.double(), A, B, C)
    with pytest.raises(RuntimeError, match="A must be on cuda"):
        torch.ops.vmq.scan_train_fwd(u, delta, A.cpu(), B, C)
    with pytest.raises(RuntimeError, match="B must be contiguous"):
        torch.ops.vmq.scan_train_bwd(u, delta, A, B.transpose(1, 2).contiguous().transpose(1, 2), C, gy)
    with pytest.raises(RuntimeError, match="grad_y must be float32"):
        torch.ops.vmq.scan_train_bwd(u, delta, A, B, C, gy[:, :, :3])
    wide = torch.zeros(65536, 1, 1, device="cuda")
    with pytest.raises(RuntimeError, match="batch up to 65535"):
        torch.ops.vmq.scan_train_fwd(wide, wide, torch.zeros(1, 1, device="cuda"), wide, wide)
