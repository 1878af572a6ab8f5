"""Token orders of multi-direction scans, as index tensors for :func:`vmq.ops.multi_scan.multi_scan`.

Tokens of an H x W grid are numbered row-major, ``t = h * W + w``. An order is a 1-D int64
tensor, made on the CPU: step ``s`` of the scan visits token ``order[s]``, or a padding position
when ``order[s] == -1``.

* ``h``: row-major (the identity); ``v``: column-major (token ``h * W + w`` at step ``w * H + h``);
* ``w2``, ``w7`` (any ``wK``): LocalMamba's windowed scan: the grid zero-padded at the bottom and
  right to multiples of K, the K x K windows visited row-major and each window row-major; the
  padding positions are steps of the scan (``-1``);
* ``<order>_flip``: the whole sequence reversed, padding included.

Vim's two directions are ``h`` and ``h_flip`` of a 1-D sequence; VMamba's four are ``h``, ``v``,
``h_flip`` and ``v_flip`` (its cross-scan order).

The models take their orders from :func:`orders_on`: made once per shape and device, so that a
forward on a GPU neither rebuilds them nor copies them from the host (a copy that waits for
the device).
"""

from __future__ import annotations

import functools
import re
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

_NAME = re.compile(r"(h|v|w(\d+))(_flip)?")


def direction_order(name: str, height: int, width: int) -> Tensor:
    """The order of direction ``name`` (``h``, ``v``, ``w<K>``, each optionally ``_flip``) on an H x W grid."""
    m = _NAME.fullmatch(name)
    if m is None:
        raise ValueError(f"unknown scan direction {name!r}: expected h, v or w<K>, optionally with _flip")
    grid = torch.arange(height * width, device="cpu").view(height, width)
    if m.group(1) == "h":
        order = grid.flatten()
    elif m.group(1) == "v":
        order = grid.t().flatten()
    else:
        k = int(m.group(2))
        if k < 1:
            raise ValueError(f"window size must be at least 1 in {name!r}")
        hp, wp = -(-height // k) * k, -(-width // k) * k
        padded = torch.full((hp, wp), -1, dtype=torch.long, device="cpu")
        padded[:height, :width] = grid
        order = padded.view(hp // k, k, wp // k, k).permute(0, 2, 1, 3).flatten()
    return order.flip(0) if m.group(3) else order


#: Vim's directions over its 1-D token sequence (forward, backward) and VMamba's cross scan
VIM_DIRECTIONS = ("h", "h_flip")
CROSS_DIRECTIONS = ("h", "v", "h_flip", "v_flip")


def sequence_orders(length: int, bidirectional: bool = True) -> Tensor:
    """Vim: forward (and backward) over a 1-D sequence, (K, length)."""
    fwd = torch.arange(length, device="cpu")
    return torch.stack([fwd, fwd.flip(0)]) if bidirectional else fwd[None]


def cross_orders(height: int, width: int) -> Tensor:
    """VMamba's cross scan: row-major, column-major and their reverses, (4, H * W)."""
    return stack_orders([direction_order(d, height, width) for d in CROSS_DIRECTIONS])


def stack_orders(orders: Sequence[Tensor], length: Optional[int] = None) -> Tensor:
    """Orders of different lengths as one (K, S) tensor, the shorter ones padded with -1 at the end."""
    steps = max(len(o) for o in orders) if length is None else length
    out = torch.full((len(orders), steps), -1, dtype=torch.long, device=orders[0].device)
    for k, o in enumerate(orders):
        out[k, :len(o)] = o
    return out


@functools.lru_cache(maxsize=None)
def _orders_on(names: Tuple[str, ...], height: int, width: int, device: torch.device) -> Tensor:
    with torch.inference_mode(False):  # a normal tensor even when first asked for under inference mode
        return stack_orders([direction_order(d, height, width) for d in names]).to(device)


def orders_on(names: Sequence[str], height: int, width: int, device: Union[str, torch.device]) -> Tensor:
    """The orders of directions ``names`` on an H x W grid stacked as (K, S) (:func:`stack_orders`),
    on ``device``; one shared tensor per arguments, which callers must not modify.

    Vim's ``sequence_orders(L)`` is ``orders_on(VIM_DIRECTIONS, 1, L, device)``."""
    return _orders_on(tuple(names), int(height), int(width), torch.device(device))


def insert_token(order: Tensor, position: int, token: int) -> Tensor:
    """``order`` over the patch tokens with an extra token (a cls token) inserted at scan step ``position``.

    Patch-token indices at or after ``token`` shift by one, so that the result indexes the
    sequence that holds the extra token at ``token``.
    """
    shifted = torch.where(order >= token, order + 1, order)
    return torch.cat([shifted[:position], torch.tensor([token], device=order.device), shifted[position:]])


__all__ = ["VIM_DIRECTIONS", "CROSS_DIRECTIONS", "direction_order", "sequence_orders", "cross_orders", "stack_orders",
           "orders_on", "insert_token"]
