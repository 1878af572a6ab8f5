"""Weighted k-means for codebooks: k-means++ seeding, Lloyd iterations, chunked assignment.

Points ``x`` are (N, d); an optional importance ``w`` (N, d) (or (d,) for all points) weights
each coordinate, so the distance of a point to a codeword ``c`` is ``sum_j w_j (x_j - c_j)^2``
and a codeword is the ``w``-weighted mean of its points, coordinate by coordinate. Expanding
the square gives the assignment as two small matmuls per chunk of points,

    dist(x, c) = sum_j w_j x_j^2  -  2 (w * x) . c  +  w . c^2,

so the full N x K distance matrix never exists: at most ``chunk`` x K of it at a time. That is
:func:`assign_ref`, the definition (the distance returned is that of the nearest centroid,
clamped at 0); :func:`assign` runs the fused kernel ``vmq::kmeans_assign``
(``csrc/cpu/kmeans_assign.cpp``: distances computed in registers for a few points against 8
centroids at a time and folded into a running minimum; a CUDA one too) on fp32 tensors when
it builds, and agrees with the reference up to fp32 rounding (so a near tie may resolve to
another index). :func:`update_centroids` likewise runs ``vmq::kmeans_update`` (one serial
pass, sums in double) or :func:`update_centroids_ref`. The ops' twins, with their arguments,
are :func:`kmeans_assign_ref` and :func:`kmeans_update_ref`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from vmq.ops import _library
from vmq.ops.backend import use_native

CHUNK_ELEMENTS = 1 << 20  # distance-matrix entries per chunk (4 MiB of fp32)


def _check(x: Tensor, w: Optional[Tensor]) -> Optional[Tensor]:
    if x.dim() != 2 or not x.is_floating_point():
        raise ValueError(f"points must be a 2-D float tensor (N, d), got {x.dtype} {tuple(x.shape)}")
    if w is None:
        return None
    if w.dim() == 1:
        w = w.expand_as(x)
    if w.shape != x.shape:
        raise ValueError(f"weights must be (d,) or shaped like the points {tuple(x.shape)}, got {tuple(w.shape)}")
    if (w < 0).any():
        raise ValueError("importance weights must be non-negative")
    return w.to(x.dtype)


def fused_available() -> bool:
    return _library.has_kernel("kmeans_assign", "cpu")


def _use_fused(x: Tensor, backend: Optional[str], op: str = "kmeans_assign") -> bool:
    """``auto``: the compiled kernel for fp32 tensors when there is one; ``cpu``/``cuda``: it or an error; ``ref``: never.

    The CUDA assignment kernel keeps a point in registers: up to 32 dimensions.
    """
    takes = x.dtype == torch.float32 and (x.device.type != "cuda" or x.dim() != 2 or x.shape[1] <= 32)
    return use_native(op, x, backend, takes=takes, why="takes float32 points (on CUDA of at most 32 dimensions)")


def assign(x: Tensor, centroids: Tensor, w: Optional[Tensor] = None, chunk: Optional[int] = None,
           return_dist: bool = False, backend: Optional[str] = None):
    """Index of the nearest centroid of every point; (N,) int64 (and the distances with ``return_dist``).

    ``backend`` (see :mod:`vmq.ops.backend`): ``auto`` (the fused kernel for fp32 tensors when
    it builds, else the reference), ``cpu`` / ``cuda`` (that kernel or an error) or ``ref``
    (:func:`assign_ref`).
    """
    if not _use_fused(x, backend):
        return assign_ref(x, centroids, w, chunk, return_dist)
    w = _check(x, w)
    if not torch.isfinite(x).all():
        raise ValueError("points hold NaN or Inf")
    codes, dist = _assign_fused(x, centroids, w)
    return (codes, dist) if return_dist else codes


def _assign_fused(x: Tensor, centroids: Tensor, w: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """The fused kernel on points and weights already checked (finite, weights non-negative and shaped)."""
    return torch.ops.vmq.kmeans_assign(x, w, centroids.to(torch.float32).contiguous())


def _update_fused(x: Tensor, codes: Tensor, centroids: Tensor, w: Optional[Tensor]) -> Tensor:
    """The fused update on points and weights already checked."""
    return torch.ops.vmq.kmeans_update(x, w, codes.to(torch.int64), centroids.to(torch.float32))


def assign_ref(x: Tensor, centroids: Tensor, w: Optional[Tensor] = None, chunk: Optional[int] = None,
               return_dist: bool = False):
    """Index of the nearest centroid of every point, ``chunk`` points at a time; (N,) int64.

    With ``return_dist``, also the (weighted) squared distance to it.
    """
    w = _check(x, w)
    n, k = x.shape[0], centroids.shape[0]
    chunk = chunk or max(1, CHUNK_ELEMENTS // max(k, 1))
    codes = torch.empty(n, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, dtype=x.dtype, device=x.device) if return_dist else None
    c = centroids.to(x.dtype)
    c_t, c2_t = c.t().contiguous(), (c * c).t().contiguous()
    c2 = c2_t.sum(0)
    for s in range(0, n, chunk):
        xs = x[s:s + chunk]
        if w is None:
            d = torch.addmm(c2, xs, c_t, alpha=-2.0)  # |c|^2 - 2 x.c; |x|^2 does not change the argmin
        else:
            ws = w[s:s + chunk]
            d = torch.addmm(ws @ c2_t, ws * xs, c_t, alpha=-2.0)
        best, idx = d.min(dim=1)
        codes[s:s + chunk] = idx
        if return_dist:
            xx = (xs * xs).sum(1) if w is None else (ws * xs * xs).sum(1)
            dist[s:s + chunk] = (best + xx).clamp(min=0)
    return (codes, dist) if return_dist else codes


def nearest_k(x: Tensor, centroids: Tensor, k: int, w: Optional[Tensor] = None,
              chunk: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """The ``k`` nearest centroids of every point, nearest first: ``(indices (N, k), squared distances (N, k))``."""
    w = _check(x, w)
    n, kk = x.shape[0], centroids.shape[0]
    if not 1 <= k <= kk:
        raise ValueError(f"k must be in 1..{kk} (the number of centroids), got {k}")
    chunk = chunk or max(1, CHUNK_ELEMENTS // max(kk, 1))
    idx = torch.empty(n, k, dtype=torch.int64, device=x.device)
    dist = torch.empty(n, k, dtype=x.dtype, device=x.device)
    c = centroids.to(x.dtype)
    c_t, c2_t = c.t().contiguous(), (c * c).t().contiguous()
    for s in range(0, n, chunk):
        xs = x[s:s + chunk]
        ws = torch.ones_like(xs) if w is None else w[s:s + chunk]
        d = torch.addmm(ws @ c2_t, ws * xs, c_t, alpha=-2.0)
        best, i = torch.topk(d, k, dim=1, largest=False, sorted=True)
        idx[s:s + chunk] = i
        dist[s:s + chunk] = (best + (ws * xs * xs).sum(1, keepdim=True)).clamp(min=0)
    return idx, dist


def kmeans_pp(x: Tensor, k: int, w: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> Tensor:
    """k-means++ seeding: each next centroid is a point drawn with probability proportional to its
    (weighted) squared distance to the nearest centroid chosen so far. Returns (k, d).

    ``generator`` is a CPU generator and every draw happens on the CPU (the distances of points on
    another device are copied over for it), so a seed picks the same points on every device, up
    to float differences in the distances."""
    w = _check(x, w)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n} (the number of points), got {k}")
    idx = torch.empty(k, dtype=torch.int64, device="cpu")
    idx[0] = torch.randint(n, (1,), generator=generator, device="cpu")
    diff = x - x[int(idx[0])]
    best = (diff * diff if w is None else w * diff * diff).sum(1)
    for i in range(1, k):
        prob = best.cpu()  # the draw's input; on a GPU this is the step's one host copy
        total = prob.sum()
        if total <= 0:  # every point sits on a centroid already: fill with random points not chosen yet
            free = torch.ones(n, dtype=torch.bool, device="cpu")
            free[idx[:i]] = False
            rest = free.nonzero().squeeze(1)
            idx[i:] = rest[torch.randperm(rest.numel(), generator=generator, device="cpu")[: k - i]]
            break
        idx[i] = torch.multinomial(prob / total, 1, generator=generator)[0]
        diff = x - x[int(idx[i])]
        torch.minimum(best, (diff * diff if w is None else w * diff * diff).sum(1), out=best)
    return x[idx.to(x.device)].clone()


def update_centroids(x: Tensor, codes: Tensor, centroids: Tensor, w: Optional[Tensor] = None,
                     backend: Optional[str] = None) -> Tensor:
    """The (weighted) mean of each cluster, coordinate by coordinate; a coordinate with no weight
    keeps its old centroid. ``backend`` as for :func:`assign` (``ref``: :func:`update_centroids_ref`)."""
    if not _use_fused(x, backend, "kmeans_update"):
        return update_centroids_ref(x, codes, centroids, w)
    return _update_fused(x, codes, centroids, _check(x, w))


def update_centroids_ref(x: Tensor, codes: Tensor, centroids: Tensor, w: Optional[Tensor] = None) -> Tensor:
    """Reference of :func:`update_centroids` (its argument order): :func:`kmeans_update_ref`."""
    return kmeans_update_ref(x, w, codes, centroids)


def kmeans_assign_ref(x: Tensor, w: Optional[Tensor], centroids: Tensor) -> Tuple[Tensor, Tensor]:
    """Twin of ``vmq::kmeans_assign``: ``(codes (N,) int64, distance to the nearest centroid (N,))``."""
    return assign_ref(x, centroids, w, return_dist=True)


def kmeans_update_ref(x: Tensor, w: Optional[Tensor], codes: Tensor, centroids: Tensor) -> Tensor:
    """Twin of ``vmq::kmeans_update``: two ``index_add_`` passes in the points' dtype."""
    w = _check(x, w)
    k, d = centroids.shape
    wx = x if w is None else w * x
    num = torch.zeros(k, d, dtype=x.dtype, device=x.device).index_add_(0, codes, wx)
    den = torch.zeros(k, d, dtype=x.dtype, device=x.device)
    den.index_add_(0, codes, torch.ones_like(x) if w is None else w)
    empty = den <= 0
    return torch.where(empty, centroids.to(x.dtype), num / den.clamp(min=torch.finfo(x.dtype).tiny))


def kmeans(x: Tensor, k: int, iterations: int = 25, w: Optional[Tensor] = None, seed: int = 0,
           chunk: Optional[int] = None, init: Optional[Tensor] = None,
           stop_early: bool = True, backend: Optional[str] = None) -> Tuple[Tensor, Tensor]:
    """Weighted k-means of the rows of ``x``: returns ``(centroids (k, d), codes (N,))``.

    ``iterations`` Lloyd steps after k-means++ seeding (or from ``init``), stopping early when no
    assignment changes (unless ``stop_early`` is off). Deterministic for a given ``seed``.
    ``backend`` picks the assignment and update kernels (see :func:`assign`).
    """
    w = _check(x, w)
    if not torch.isfinite(x).all():
        raise ValueError("points hold NaN or Inf")
    if init is None:
        gen = torch.Generator(device="cpu").manual_seed(seed)  # on the CPU for every device: same draws
        centroids = kmeans_pp(x, k, w, gen)
    else:
        if init.shape != (k, x.shape[1]):
            raise ValueError(f"init must be ({k}, {x.shape[1]}), got {tuple(init.shape)}")
        centroids = init.to(x.dtype).clone()
    # points and weights are checked once above, not in every iteration
    if _use_fused(x, backend):
        step_assign = lambda c: _assign_fused(x, c, w)[0]  # noqa: E731
    else:
        step_assign = lambda c: assign_ref(x, c, w, chunk)  # noqa: E731
    step_update = _update_fused if _use_fused(x, backend, "kmeans_update") else update_centroids_ref
    codes = step_assign(centroids)
    for _ in range(iterations):
        centroids = step_update(x, codes, centroids, w)
        new = step_assign(centroids)
        if stop_early and torch.equal(new, codes):
            break
        codes = new
    return centroids, codes


__all__ = ["kmeans", "kmeans_pp", "assign", "assign_ref", "fused_available", "kmeans_assign_ref", "kmeans_update_ref",
           "nearest_k", "update_centroids", "update_centroids_ref", "CHUNK_ELEMENTS"]
