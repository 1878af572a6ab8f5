"""Reading checkpoints: official ``.pth`` files, plain state dicts and ``.safetensors``.

Files are never unpickled: ``.pth`` goes through ``torch.load(..., weights_only=True)`` behind
size checks (:mod:`vmq.models.pth`); a ``.safetensors`` header is checked first
(:func:`vmq.safefile.read_header`).
A key or shape mismatch is an error that lists what is missing and unexpected and names the
registered model whose keys would fit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, List, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from vmq.errors import VmqError
from vmq.models.pth import check_tensors, read_pth
from vmq.safefile import read_header

StateDict = Dict[str, Tensor]


def read_state_dict(path: Union[str, Path]) -> StateDict:
    """Read a checkpoint file into a flat fp32 CPU state dict (official wrappers removed)."""
    path = Path(path)
    if not path.exists():
        raise VmqError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise VmqError(f"checkpoint is not a file: {path}")
    if path.stat().st_size == 0:
        raise VmqError(f"checkpoint is empty: {path}")
    if path.suffix == ".safetensors":
        read_header(path)  # the header checked before the library reads anything
        try:
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as exc:
            raise VmqError(f"cannot read {path}: not a valid safetensors file ({_short(exc)})") from None
    else:
        sd = _unwrap(read_pth(path), path)
        check_tensors(sd, path)
    out = {}
    for k, v in sd.items():
        if not isinstance(v, Tensor):
            continue
        k = k[len("module."):] if k.startswith("module.") else k
        out[k] = v.float() if v.is_floating_point() else v
    if not out:
        raise VmqError(f"{path} holds no tensors")
    return out


def _unwrap(obj, path: Path) -> StateDict:
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "model_ema"):
            if key in obj and isinstance(obj[key], dict):
                return obj[key]
        if any(isinstance(v, Tensor) for v in obj.values()):
            return obj
    raise VmqError(f"{path} is not a state dict or an official checkpoint ({{'model': state_dict}})")


def _short(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return msg[:160]


def _list(keys: List[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def load_state_dict_strict(model: nn.Module, sd: StateDict, source: str, target: str,
                           hint: Callable[[], List[str]]) -> None:
    """Load ``sd`` into ``model`` strictly; a mismatch raises a VmqError listing what is missing,
    unexpected or misshapen, and naming the first model ``hint()`` says would fit."""
    ref = model.state_dict()
    missing = [k for k in ref if k not in sd]
    unexpected = [k for k in sd if k not in ref]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(ref[k].shape)}" for k in ref
             if k in sd and tuple(sd[k].shape) != tuple(ref[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_list(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
        if wrong:
            parts.append(f"{len(wrong)} shape mismatches ({_list(wrong, 2)})")
        fits = hint()
        raise VmqError(f"{source} does not fit {target}: " + ", ".join(parts)
                       + (f"; it fits {fits[0]}" if fits else "; no registered model fits these keys"))
    model.load_state_dict({k: v.to(ref[k].dtype) for k, v in sd.items()}, strict=True)
