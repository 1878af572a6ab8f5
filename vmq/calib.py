"""Calibration statistics: what quantization needs of every linear layer's input, block by block.

:class:`LinearObserver` records, for chosen linear layers of a module, :class:`LayerStats`: the
min and max of each (token position, channel) pair and each channel's second moment. That is
enough to derive, exactly, the per-channel max |x| that smoothing needs and the per-token or
per-tensor ranges after any per-channel smoothing; the token count of each layer's input comes
from here too (a hierarchical model has several). :func:`observe_inputs` keeps raw inputs of a
few samples instead. :func:`collect_stats` runs the floating-point model block by block (through
its family, :mod:`vmq.models.family`) over the calibration images; :class:`CalibStats` is the
cache ``vmq calibrate`` writes: a safetensors file tied to the model (name, family, config and a
hash of its weights) that ``vmq quantize --stats`` reuses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from vmq.activations import ActivationStore
from vmq.distributed import SINGLE, Dist
from vmq.errors import VmqError
from vmq.fileio import atomic_path
from vmq.models.family import BlockIO, ModelFamily, family_of, io_slice
from vmq.modules import linear_names
from vmq.progress import ProgressStore, images_sha256, tensor_sha256
from vmq.runtime import ieee_float32
from vmq.safefile import SafeHeader, read_header

STATS_FORMAT = "vmq.calibration"
STATS_VERSION = 1


@torch.no_grad()
def observe_inputs(family: ModelFamily, block: nn.Module, names: List[str], inputs: BlockIO, num_samples: int,
                   batch_size: int, prefix: str = "") -> Dict[str, Tensor]:
    """Run the first ``num_samples`` of ``inputs`` through ``block``; the inputs its layers
    ``names`` saw, each (samples, tokens, channels)."""
    with LinearObserver(block, names, keep_samples=num_samples, prefix=prefix) as obs:
        family.run_batched(block, io_slice(inputs, slice(0, num_samples)), batch_size)
    return {n: st.sample_tensor() for n, st in obs.stats.items()}


@dataclass
class LayerStats:
    """What one linear layer's input (samples, tokens, channels) looked like over the calibration set."""

    min: Tensor  # (tokens, channels)
    max: Tensor  # (tokens, channels)
    sq_sum: Tensor  # (channels,) float64: sum of x^2 over samples and tokens
    count: int = 0  # token vectors seen
    samples: List[Tensor] = field(default_factory=list)  # raw inputs, up to a cap (not saved)

    @classmethod
    def empty(cls, tokens: int, channels: int, device: torch.device) -> "LayerStats":
        inf = torch.full((tokens, channels), float("inf"), device=device)
        return cls(inf.clone(), -inf, torch.zeros(channels, dtype=torch.float64, device=device))

    @property
    def tokens(self) -> int:
        """Token positions of the layer's input (what per-token static quantization needs)."""
        return self.min.shape[0]

    def to(self, device: torch.device) -> "LayerStats":
        return LayerStats(self.min.to(device), self.max.to(device), self.sq_sum.to(device), self.count)

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

    def reduce(self, dist: Dist) -> "LayerStats":
        """The statistics over every process's images (torch.distributed): minima, maxima and
        counts exact, the float64 sums of squares up to summation order."""
        if not dist.active:
            return self
        return LayerStats(dist.min(self.min), dist.max(self.max), dist.sum(self.sq_sum), dist.sum_int(self.count))

    def sample_tensor(self) -> Tensor:
        return torch.cat(self.samples) if self.samples else torch.empty(0, device=self.min.device)


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
                st = self.stats[name] = LayerStats.empty(x.shape[1], x.shape[2], x.device)
            st.update(x, self.keep)
        return hook

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of ``model``'s state dict."""
    return tensor_sha256(sorted(model.state_dict().items()))


@dataclass
class CalibStats:
    layers: Dict[str, LayerStats]
    meta: dict
    source: str = "stats"  # what error messages call it (the file it was loaded from)
    #: the progress kept while collecting (:func:`collect_stats` ``progress_dir``); removed by :meth:`save`
    progress: Optional[ProgressStore] = field(default=None, repr=False, compare=False)

    def save(self, path: Union[str, Path]) -> None:
        """Write the stats file atomically (then remove the progress kept while collecting them)."""
        tensors = {}
        for name, st in self.layers.items():
            tensors[f"{name}.min"], tensors[f"{name}.max"] = st.min.cpu().contiguous(), st.max.cpu().contiguous()
            tensors[f"{name}.sq_sum"] = st.sq_sum.cpu().contiguous()
        meta = dict(self.meta, counts={n: st.count for n, st in self.layers.items()})
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"vmq": json.dumps(meta, sort_keys=True)})
        if self.progress is not None:
            self.progress.remove()
            self.progress = None

    @classmethod
    def load(cls, path: Union[str, Path]) -> "CalibStats":
        path = Path(path)
        if not path.is_file():
            raise VmqError(f"calibration stats not found: {path}")
        header = read_header(path, "calibration stats ")  # checked before anything is read
        try:
            meta = json.loads(header.metadata.get("vmq", "null"))
        except ValueError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != STATS_FORMAT:
            raise VmqError(f"{path} is not a vmq calibration stats file (write one with `vmq calibrate`)")
        if meta.get("format_version") != STATS_VERSION:
            raise VmqError(f"{path}: stats format version {str(meta.get('format_version'))[:20]} is not supported "
                           f"(this vmq reads version {STATS_VERSION})")
        counts = meta.get("counts")
        if not isinstance(counts, dict) or not all(isinstance(c, int) and c >= 0 for c in counts.values()):
            raise VmqError(f"cannot read calibration stats {path}: broken metadata (counts)")
        for name in counts:
            _check_stats_entries(header, name)
        try:
            with safe_open(str(path), framework="pt") as f:
                layers = {name: LayerStats(f.get_tensor(f"{name}.min"), f.get_tensor(f"{name}.max"),
                                           f.get_tensor(f"{name}.sq_sum"), int(count))
                          for name, count in counts.items()}
        except Exception as exc:
            raise VmqError(f"cannot read calibration stats {path}: {type(exc).__name__}: {exc}".splitlines()[0]
                           ) from None
        return cls(layers, meta, str(path))

    def check(self, model: nn.Module) -> None:
        """Refuse stats that were not computed on this model (name, config and weights)."""
        source = self.source
        name = getattr(model, "vmq_name", None)
        if self.meta.get("model") != name or self.meta.get("config") != _config_dict(model):
            raise VmqError(f"{source} was calibrated on model {self.meta.get('model')!r} with another configuration, "
                           f"not on {name!r}; run `vmq calibrate` for this model")
        if self.meta.get("weights_sha256") != model_fingerprint(model):
            raise VmqError(f"{source} was calibrated on other weights of {name} (weights sha256 differs); "
                           "run `vmq calibrate` with this checkpoint")


def _check_stats_entries(header: SafeHeader, name: str) -> None:
    """A layer's min, max (tokens, channels) and sq_sum (channels,) are there, floating point and consistent."""
    found = {k: header.entries.get(f"{name}.{k}") for k in ("min", "max", "sq_sum")}
    lacking = [f"{name}.{k}" for k, e in found.items() if e is None]
    if lacking:
        raise VmqError(f"cannot read calibration stats {header.path}: tensor {lacking[0]} is missing")
    lo, hi, sq = found["min"], found["max"], found["sq_sum"]
    if (any(e.dtype not in ("F32", "F64") for e in (lo, hi, sq)) or len(lo.shape) != 2 or lo.shape != hi.shape
            or sq.shape != lo.shape[1:]):
        raise VmqError(f"cannot read calibration stats {header.path}: layer {name}'s tensors are "
                       f"{lo.dtype} {list(lo.shape)}, {hi.dtype} {list(hi.shape)}, {sq.dtype} {list(sq.shape)}; "
                       "expected float (tokens, channels) twice and (channels,)")


def _config_dict(model: nn.Module) -> dict:
    family = family_of(model)
    return family.config_to_dict(family.config_of(model))


@torch.no_grad()
def collect_stats(model: nn.Module, images: Tensor, batch_size: int = 32, data: str = "",
                  on_block: Optional[Callable[[int, int], None]] = None,
                  store: Optional[ActivationStore] = None, dist: Dist = SINGLE,
                  progress_dir: Union[str, Path, None] = None, resume: bool = False) -> CalibStats:
    """Run the floating-point ``model`` block by block and record every block linear layer's input stats.

    The images are moved to the model's device a batch at a time; one block's inputs and outputs
    are kept at a time, where ``store`` places them (default: on the model's device). The
    statistics stay on the device (``save`` writes them from the CPU). On CUDA in full fp32
    (:func:`vmq.runtime.ieee_float32`), like the CPU. Under torch.distributed (``dist``),
    ``images`` are this process's shard (at least one image) and every process gets the
    statistics of all of them (:meth:`LayerStats.reduce`).

    ``progress_dir``: keep each finished block's stats there (:mod:`vmq.progress`); with
    ``resume``, take the blocks recorded there (made with this model, these images and this batch
    size, else refused) and run them forward only. The returned stats' ``save`` removes the folder.
    Under torch.distributed rank 0 keeps the folder (:class:`ProgressStore`)."""
    if not torch.isfinite(images).all():
        raise VmqError("calibration images hold NaN or Inf")
    family = family_of(model)
    device = next(model.parameters()).device
    store = store if store is not None else ActivationStore(device)
    layers: Dict[str, LayerStats] = {}
    blocks = family.blocks(model)
    fingerprint = model_fingerprint(model)
    progress = None
    if progress_dir is not None:
        progress = ProgressStore.open(progress_dir, {
            "command": "calibrate", "settings": {"num_images": dist.sum_int(int(images.shape[0])),
                                                 "batch_size": batch_size},
            "model_sha256": fingerprint, "images_sha256": images_sha256(images, batch_size, dist),
            "blocks": len(blocks)}, resume, dist)
    with ieee_float32(device):
        io = store.embed(family, model, images, batch_size)
        for i, (prefix, block) in enumerate(blocks):
            if progress is not None and i < progress.done:  # recorded before an interruption
                layers.update(_stats_from_record(*progress.load_block(i), device))
                io = store.run(family, block, io, batch_size)
            else:
                with LinearObserver(block, linear_names(block), prefix=prefix) as obs:
                    io = store.run(family, block, io, batch_size)
                # reduced over processes, in one order on all ranks
                found = {prefix + name: obs.stats[name].reduce(dist) for name in sorted(obs.stats)}
                layers.update(found)
                if progress is not None:
                    progress.save_block(i, *_stats_record(found))
            if on_block is not None:
                on_block(i + 1, len(blocks))
    meta = {
        "format": STATS_FORMAT,
        "format_version": STATS_VERSION,
        "model": getattr(model, "vmq_name", None),
        "family": family.name,
        "config": family.config_to_dict(family.config_of(model)),
        "weights_sha256": fingerprint,
        "num_images": dist.sum_int(int(images.shape[0])),
        "image_size": list(images.shape[-2:]),
        "data": data,
    }
    return CalibStats(layers, meta, progress=progress)


def _stats_record(layers: Dict[str, LayerStats]) -> Tuple[Dict[str, Tensor], dict]:
    """One block's stats as progress tensors and metadata (:meth:`ProgressStore.save_block`)."""
    tensors = {}
    for name, st in layers.items():
        tensors[f"{name}.min"], tensors[f"{name}.max"], tensors[f"{name}.sq_sum"] = st.min, st.max, st.sq_sum
    return tensors, {"names": list(layers), "counts": {name: st.count for name, st in layers.items()}}


def _stats_from_record(tensors: Dict[str, Tensor], meta: dict, device: torch.device) -> Dict[str, LayerStats]:
    try:
        return {name: LayerStats(tensors[f"{name}.min"].to(device), tensors[f"{name}.max"].to(device),
                                 tensors[f"{name}.sq_sum"].to(device), int(meta["counts"][name]))
                for name in meta["names"]}
    except (KeyError, TypeError, ValueError) as exc:
        raise VmqError(f"broken calibration progress record (missing {exc}); remove the progress folder to "
                       "start over") from None
