"""Helpers of the GPU contract tests (tests/test_gpu_contract.py): poisoned outputs, odd layouts,
Vim's scan inputs as its mixer lays them out, CUDA graph capture, a round-to-nearest integer model."""

import contextlib
import warnings

import torch
from torch import nn

from vmq.layers import QuantizedLinear
from vmq.models import family_of
from vmq.models.scan_orders import sequence_orders
from vmq.modules import set_module
from vmq.ops.quantize import range_to_qparams


def cuda(ts):
    return [t.cuda() if isinstance(t, torch.Tensor) else cuda(t) if isinstance(t, list) else t for t in ts]


def misaligned(t):
    """The same values, contiguous, at one element past an aligned address (the kernels' vector paths are off)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    view = buf[1:].view(t.shape)
    view.copy_(t)
    return view


def spread(t):
    """The same values as a non-contiguous view (last stride 2)."""
    return torch.stack([t, t], -1)[..., 0]


@contextlib.contextmanager
def poisoned():
    """Every fresh CUDA tensor starts as NaN (floats) or all-ones bytes (integers: 255 for uint8).

    Through ``torch.use_deterministic_algorithms`` (``fill_uninitialized_memory``), which fills what
    ``at::empty`` returns, the kernels' outputs included; the allocator's free blocks are filled with
    0xFF bytes as well.
    """
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full((1 << 26,), -1, dtype=torch.int32, device="cuda")]
    blocks += [torch.full((1 << 16,), -1, dtype=torch.int32, device="cuda") for _ in range(64)]
    del blocks  # back in the allocator's cache, 0xFF bytes
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
             torch.utils.deterministic.fill_uninitialized_memory)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        torch.use_deterministic_algorithms(state[0], warn_only=state[1])
        torch.utils.deterministic.fill_uninitialized_memory = state[2]


def vim_scan(b, d, length, n, seed=0, value=torch.float32, fdtype=torch.float32, merge="mean"):
    """The schema's arguments of vmq::multi_scan on Vim's two orders, laid out as the mixer passes them:
    u channel-major, delta and z token-major, B and C column slices of x_proj's output."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    orders = sequence_orders(length)
    if value == torch.int8:
        u = [torch.randint(-127, 128, (b, d, length), dtype=torch.int8, generator=g) for _ in range(2)]
        delta = [torch.randint(-127, 128, (b, length, d), dtype=torch.int8, generator=g).transpose(1, 2)
                 for _ in range(2)]
        scales = [torch.rand(2, length, generator=g) * s + 1e-3 for s in (0.02, 0.01)]
    else:
        u = [r(b, d, length).to(value) for _ in range(2)]
        delta = [(r(b, length, d) * 0.5 - 1).to(value).transpose(1, 2) for _ in range(2)]
        scales = [None, None]
    x_dbl = [r(b, length, 12 + 2 * n).to(fdtype) for _ in range(2)]
    B, C = [x[..., 12:12 + n].transpose(1, 2) for x in x_dbl], [x[..., 12 + n:].transpose(1, 2) for x in x_dbl]
    z = r(b, length, d).to(fdtype).transpose(1, 2)
    return [u, delta, -torch.exp(r(2, d, n) * 0.5), B, C, r(2, d), r(2, d) * 0.5, z, orders, orders, *scales, length,
            True, merge]


def floats(args):
    return [[x.float() if x.dtype == torch.float16 else x for x in a] if isinstance(a, list)
            else a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.float16 else a for a in args]


def capture(fn):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def quantize_linears(model, images, w_bits, a_strategy):
    """Every Linear of the blocks as a QuantizedLinear: symmetric per-channel weights, activations
    calibrated on ``images`` (round to nearest; what PTQ's runtime layers compute)."""
    names = [p + n for p, block in family_of(model).blocks(model) for n, m in block.named_modules()
             if isinstance(m, nn.Linear)]
    seen = {}
    hooks = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, a, name=n: seen.setdefault(name, []).append(a[0].detach())) for n in names]
    with torch.no_grad():
        model(images)
    for h in hooks:
        h.remove()
    for name in names:
        lin, x = model.get_submodule(name), torch.cat(seen[name])
        qmax = 2 ** (w_bits - 1) - 1
        w_scale = lin.weight.detach().abs().amax(1).clamp_min(1e-8) / qmax
        w_int = torch.clamp(torch.round(lin.weight.detach() / w_scale[:, None]), -qmax - 1, qmax).to(torch.int8)
        scale = zp = None
        if a_strategy == "token_static":
            scale, zp = range_to_qparams(x.amin((0, 2)), x.amax((0, 2)), 8)
        elif a_strategy == "tensor_static":
            scale, zp = range_to_qparams(x.min().reshape(1), x.max().reshape(1), 8)
        bias = None if lin.bias is None else lin.bias.detach()
        set_module(model, name, QuantizedLinear(w_int, w_scale, w_bits, "channel", 8, a_strategy, scale, zp, None, bias))
    return names
