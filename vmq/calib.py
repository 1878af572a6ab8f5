"""Calibration, block by block: capture a block's inputs, observe its linear layers, run it.

Vim blocks pass ``(hidden, residual)`` along. :func:`embed_inputs` gives block 0's inputs for a
set of images; :func:`run_block` gives the next block's inputs; :func:`blockwise` drives a fit
(PTQ, VQ) through the blocks in order; :class:`LinearObserver` records,
for chosen linear layers, what quantization needs of their inputs (:class:`LayerStats`).

:func:`collect_stats` runs the floating-point model over calibration images and keeps, for every
linear layer in its blocks, the min and max of each (token position, channel) pair and each
channel's second moment. That is enough to derive, exactly, the per-channel max |x| that
smoothing needs and the per-token or per-tensor ranges after any per-channel smoothing.
:class:`CalibStats` is the cache ``vmq calibrate`` writes: a safetensors file tied to the model
(name, config and a hash of its weights) that ``vmq quantize --stats`` reuses.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from vmq.errors import VmqError

BlockIO = Tuple[Tensor, Optional[Tensor]]
STATS_FORMAT = "vmq.calibration"
STATS_VERSION = 1


@torch.no_grad()
def embed_inputs(model: nn.Module, images: Tensor, batch_size: int = 32) -> BlockIO:
    """Block 0's inputs: the embedded tokens of ``images`` (N, 3, H, W); no residual yet."""
    return torch.cat([model.embed(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]), None


@torch.no_grad()
def run_block(block: nn.Module, inputs: BlockIO, batch_size: int = 32) -> BlockIO:
    """Run one block over all samples in batches; returns its ``(hidden, residual)`` outputs."""
    hidden, residual = inputs
    outs_h, outs_r = [], []
    for i in range(0, hidden.shape[0], batch_size):
        r = None if residual is None else residual[i:i + batch_size]
        h, r = block(hidden[i:i + batch_size], r)
        outs_h.append(h)
        outs_r.append(r)
    return torch.cat(outs_h), torch.cat(outs_r)


def blockwise(model: nn.Module, images: Tensor, targets: List[str], fit_block: Callable, batch_size: int = 32,
              train_scan: Optional[Callable] = None, on_block: Optional[Callable[[int, int, str], None]] = None,
              what: str = "quantized") -> None:
    """Fit ``model``'s target layers block by block, each block fed the already fitted blocks' outputs.

    For every block holding targets, ``fit_block(index, block, prefix, names, q_io, fp_out)``
    replaces the layers ``names`` (relative to ``prefix``) in place: ``q_io`` are the block's
    inputs from the fitted blocks before it, ``fp_out`` the floating-point block's outputs on
    floating-point inputs. ``train_scan`` (a differentiable one-direction scan) replaces every
    mixer's scan meanwhile; the model's own scan is restored afterwards.
    """
    model.eval()  # no drop-path while calibrating
    mixers = [b.mixer for b in model.layers]
    saved_scans = [m.scan_fn for m in mixers]
    if train_scan is not None:
        for m in mixers:
            m.scan_fn = train_scan
    try:
        fp_io = embed_inputs(model, images, batch_size)
        q_io = fp_io
        for i, block in enumerate(model.layers):
            prefix = f"layers.{i}."
            names = [t[len(prefix):] for t in targets if t.startswith(prefix)]
            fp_out = run_block(block, fp_io, batch_size)
            if names:
                fit_block(i, block, prefix, names, q_io, fp_out)
            q_io = run_block(block, q_io, batch_size) if names or q_io is not fp_io else fp_out
            if not (torch.isfinite(q_io[0]).all() and torch.isfinite(q_io[1]).all()):
                raise VmqError(f"{what} block {i} produced NaN or Inf")
            fp_io = fp_out
            if on_block is not None:
                on_block(i + 1, len(model.layers), prefix)
    finally:
        for m, fn in zip(mixers, saved_scans):
            m.scan_fn = fn


@torch.no_grad()
def observe_inputs(block: nn.Module, names: List[str], inputs: BlockIO, num_samples: int, batch_size: int = 32,
                   prefix: str = "") -> Dict[str, Tensor]:
    """Run the first ``num_samples`` of ``inputs`` through ``block``; the inputs its layers ``names`` saw,
    each (samples, tokens, channels)."""
    k = min(num_samples, inputs[0].shape[0])
    with LinearObserver(block, names, keep_samples=k, prefix=prefix) as obs:
        run_block(block, (inputs[0][:k], None if inputs[1] is None else inputs[1][:k]), batch_size)
    return {n: st.sample_tensor() for n, st in obs.stats.items()}


def check_stats_cover(model: nn.Module, targets: List[str], stats: "CalibStats", token_static: bool) -> None:
    """The stats hold every target, at the model's token count when activations are per-token static."""
    missing = [t for t in targets if t not in stats.layers]
    if missing:
        raise VmqError(f"the calibration stats have no entry for {missing[0]}")
    if token_static:
        tokens = stats.layers[targets[0]].min.shape[0]
        if tokens != model.cfg.num_tokens:
            raise VmqError(f"per-token static activations were calibrated on {tokens} tokens but the model "
                           f"reads {model.cfg.num_tokens}; calibrate at the model's input size")


@dataclass
class LayerStats:
    """What one linear layer's input (samples, tokens, channels) looked like over the calibration set."""

    min: Tensor  # (tokens, channels)
    max: Tensor  # (tokens, channels)
    sq_sum: Tensor  # (channels,) float64: sum of x^2 over samples and tokens
    count: int = 0  # token vectors seen
    samples: List[Tensor] = field(default_factory=list)  # raw inputs, up to a cap (not saved)

    @classmethod
    def empty(cls, tokens: int, channels: int) -> "LayerStats":
        inf = torch.full((tokens, channels), float("inf"))
        return cls(inf.clone(), -inf, torch.zeros(channels, dtype=torch.float64))

    def update(self, x: Tensor, keep: int = 0) -> None:
        x = x.detach().float()
        self.min = torch.minimum(self.min, x.amin(dim=0))
        self.max = torch.maximum(self.max, x.amax(dim=0))
        self.sq_sum += x.double().pow(2).sum(dim=(0, 1))
        self.count += x.shape[0] * x.shape[1]
        room = keep - sum(s.shape[0] for s in self.samples)
        if room > 0:
            self.samples.append(x[:room].clone())

    @property
    def channel_absmax(self) -> Tensor:
        return torch.maximum(self.min.abs(), self.max.abs()).amax(dim=0)

    @property
    def second_moment(self) -> Tensor:
        """E[x_c^2] per channel (the diagonal of the input second moment)."""
        return (self.sq_sum / max(1, self.count)).float()

    def ranges(self, smooth: Optional[Tensor] = None, per_token: bool = True) -> Tuple[Tensor, Tensor]:
        """(lo, hi) of ``x / smooth`` per token position (tokens,) or over the tensor (1,); exact."""
        lo, hi = self.min, self.max
        if smooth is not None:  # division by a positive per-channel scale keeps min and max apart
            lo, hi = lo / smooth, hi / smooth
        lo, hi = lo.amin(dim=1), hi.amax(dim=1)
        return (lo, hi) if per_token else (lo.amin().reshape(1), hi.amax().reshape(1))

    def sample_tensor(self) -> Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0)


class LinearObserver:
    """Context manager: records :class:`LayerStats` of the named linear layers of ``module``."""

    def __init__(self, module: nn.Module, names: Iterable[str], keep_samples: int = 0, prefix: str = ""):
        self.module, self.names, self.keep, self.prefix = module, list(names), keep_samples, prefix
        self.stats: Dict[str, LayerStats] = {}
        self._handles = []

    def __enter__(self) -> "LinearObserver":
        mods = dict(self.module.named_modules())
        for name in self.names:
            if name not in mods:
                raise KeyError(f"no layer named {name!r}")
            self._handles.append(mods[name].register_forward_pre_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def hook(_mod, args):
            x = args[0]
            if x.dim() != 3:
                raise ValueError(f"{name}: expected (batch, tokens, channels) input, got {tuple(x.shape)}")
            if not torch.isfinite(x).all():
                raise VmqError(f"calibration: the input of {self.prefix}{name} holds NaN or Inf; check the "
                               "checkpoint and the images")
            st = self.stats.get(name)
            if st is None:
                st = self.stats[name] = LayerStats.empty(x.shape[1], x.shape[2])
            st.update(x, self.keep)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def block_linear_names(block: nn.Module) -> List[str]:
    return [n for n, m in block.named_modules() if isinstance(m, nn.Linear)]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``model``'s state dict."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class CalibStats:
    layers: Dict[str, LayerStats]
    meta: dict

    def save(self, path: Union[str, Path]) -> None:
        from safetensors.torch import save_file

        from vmq.fileio import atomic_path

        tensors = {}
        for name, st in self.layers.items():
            tensors[f"{name}.min"], tensors[f"{name}.max"] = st.min.contiguous(), st.max.contiguous()
            tensors[f"{name}.sq_sum"] = st.sq_sum.contiguous()
        meta = dict(self.meta, counts={n: st.count for n, st in self.layers.items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"vmq": json.dumps(meta, sort_keys=True)})

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CalibStats":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise VmqError(f"calibration stats not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("vmq", "null"))
                if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
                    raise VmqError(f"{path} is not a vmq calibration stats file (write one with `vmq calibrate`)")
                if meta.get("format_version") != STATS_VERSION:
                    raise VmqError(f"{path}: stats format version {meta.get('format_version')} is not supported "
                                   f"(this vmq reads version {STATS_VERSION})")
                layers = {}
                for name, count in meta["counts"].items():
                    layers[name] = LayerStats(f.get_tensor(f"{name}.min"), f.get_tensor(f"{name}.max"),
                                              f.get_tensor(f"{name}.sq_sum"), int(count))
        except VmqError:
            raise
        except Exception as exc:
            raise VmqError(f"cannot read calibration stats {path}: {type(exc).__name__}: {exc}".splitlines()[0]) from None
        return cls(layers, meta)

    def check(self, model: nn.Module, source: str = "stats") -> None:
        """Refuse stats that were not computed on this model (name, config and weights)."""
        name = getattr(model, "vmq_name", None)
        if self.meta.get("model") != name or self.meta.get("config") != model.cfg.to_dict():
            raise VmqError(f"{source} was calibrated on model {self.meta.get('model')!r} with another configuration, "
                           f"not on {name!r}; run `vmq calibrate` for this model")
        if self.meta.get("weights_sha256") != model_fingerprint(model):
            raise VmqError(f"{source} was calibrated on other weights of {name} (weights sha256 differs); "
                           "run `vmq calibrate` with this checkpoint")


@torch.no_grad()
def collect_stats(model: nn.Module, images: Tensor, batch_size: int = 32, data: str = "",
                  on_block: Optional[Callable[[int, int], None]] = None) -> CalibStats:
    """Run the floating-point ``model`` block by block and record every block linear layer's input stats."""
    if not torch.isfinite(images).all():
        raise VmqError("calibration images hold NaN or Inf")
    io = embed_inputs(model, images, batch_size)
    layers: Dict[str, LayerStats] = {}
    for i, block in enumerate(model.layers):
        prefix = f"layers.{i}."
        with LinearObserver(block, block_linear_names(block), prefix=prefix) as obs:
            io = run_block(block, io, batch_size)
        for name, st in obs.stats.items():
            layers[prefix + name] = st
        if on_block is not None:
            on_block(i + 1, len(model.layers))
    meta = {
        "format": STATS_FORMAT,
        "format_version": STATS_VERSION,
        "model": getattr(model, "vmq_name", None),
        "config": model.cfg.to_dict(),
        "weights_sha256": model_fingerprint(model),
        "num_images": int(images.shape[0]),
        "image_size": list(images.shape[-2:]),
        "data": data,
    }
    return CalibStats(layers, meta)
