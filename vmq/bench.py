"""End-to-end speed of a floating-point model and its compressed model, measured in one run.

:func:`run_bench` times every model on the same random images, interleaved (one forward of
each model in turn, the order rotating every repeat, so that drift in clock speed or in other
load hits all models alike), after warm-up, with the device synchronised around each forward;
it reports medians. Per batch size and model: latency, images/s, the speed-up over the
floating-point baseline, and on CUDA the peak memory allocated by one forward. With
``layers=True`` a second pass times the model's parts with hooks, in the groups its family
defines (for Vim: patch embedding, each projection kind summed over the blocks, the rest of each
Mamba layer: conv, scan and gates; norms and head).

The baseline for a packed file is the same architecture with the file's weights dequantized to
floating point (:func:`float_twin`): same shapes, so it is the speed an unquantized deployment
of this model would have. On CUDA the baseline runs in fp16, on mamba-ssm's fused scan when
mamba-ssm is installed and on vmq's own scan otherwise (the result says which).
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, ContextManager, Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

from vmq.errors import VmqError
from vmq.layers import runtime_layers
from vmq.models.family import family_of
from vmq.modules import set_module
from vmq.ops.backend import use_backend
from vmq.ops.scan import mamba_ssm_available


@dataclass
class BenchModel:
    """One model to time: its label, the module, and the dtype of its input images."""

    label: str
    model: nn.Module
    dtype: torch.dtype = torch.float32
    notes: Dict[str, str] = field(default_factory=dict)
    context: Callable[[], ContextManager] = contextlib.nullcontext  # entered while the model is timed


def float_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every runtime layer replaced by an ``nn.Linear`` of its floating-point
    equivalent weight (any smoothing folded in): the model the compressed one approximates."""
    twin = copy.deepcopy(model)
    for name, m in list(runtime_layers(twin)):
        w = m.float_weight().float()
        bias = m.bias_tensor()
        lin = nn.Linear(m.in_features, m.out_features, bias=bias is not None, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w)
            if bias is not None:
                lin.bias.copy_(bias.float())
        set_module(twin, name, lin)
    return twin


def gpu_baseline(model: nn.Module) -> BenchModel:
    """The fp16 CUDA baseline: mamba-ssm's scan when installed, vmq's own fused scan otherwise."""
    fp16 = copy.deepcopy(model).half()
    if mamba_ssm_available():
        return BenchModel("fp16", fp16, torch.float16, {"scan": "mamba-ssm selective_scan_fn"},
                          lambda: family_of(fp16).scan_implementation(fp16, "mamba_ssm"))
    return BenchModel("fp16", fp16, torch.float16, {"scan": "vmq multi_scan"})


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers as held in memory."""
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _forward_seconds(model: nn.Module, x: Tensor) -> float:
    _sync(x.device)
    start = time.perf_counter()
    model(x)
    _sync(x.device)
    return time.perf_counter() - start


def _peak_memory_mb(model: nn.Module, x: Tensor) -> Optional[float]:
    """CUDA: peak memory allocated during one forward beyond what was allocated before; None on CPU."""
    if x.device.type != "cuda":
        return None
    _sync(x.device)
    before = torch.cuda.memory_allocated(x.device)
    torch.cuda.reset_peak_memory_stats(x.device)
    model(x)
    _sync(x.device)
    return round((torch.cuda.max_memory_allocated(x.device) - before) / 2 ** 20, 2)


def layer_times(model: nn.Module, x: Tensor, repeats: int) -> Dict[str, float]:
    """Median milliseconds per forward of each breakdown group of the model's family (hooks with
    device syncs around each part)."""
    family = family_of(model)
    groups = family.bench_groups
    runs: List[Dict[str, float]] = []
    current: Dict[str, float] = {}
    starts: Dict[int, float] = {}
    handles = []

    def pre(mod, _inp):
        _sync(x.device)
        starts[id(mod)] = time.perf_counter()

    def post_for(group):
        def post(mod, _inp, _out):
            _sync(x.device)
            current[group] = current.get(group, 0.0) + time.perf_counter() - starts.pop(id(mod))
        return post

    for name, mod in model.named_modules():
        group = family.bench_group(name)
        if group is not None:
            handles.append(mod.register_forward_pre_hook(pre))
            handles.append(mod.register_forward_hook(post_for(group)))
    try:
        model(x)  # warm the hooks' path once
        for _ in range(repeats):
            current = {}
            current["total"] = _forward_seconds(model, x)
            runs.append(current)
    finally:
        for h in handles:
            h.remove()
    keys = [g for g in groups.order if g not in {label for label, _ in groups.remainders.values()}]
    keys += list(groups.remainders) + ["total"]
    out = {key: statistics.median([r.get(key, 0.0) for r in runs]) * 1e3 for key in keys}
    for container, (label, inner) in groups.remainders.items():
        out[label] = max(0.0, out.pop(container) - sum(out[k] for k in inner))
    timed = sum(out[k] for k in groups.order)
    out = {k: out[k] for k in (*groups.order, "total")}
    out["rest (embeddings, residuals, hooks)"] = max(0.0, out["total"] - timed)
    return {k: round(v, 3) for k, v in out.items()}


def run_bench(models: Sequence[BenchModel], image_size: int, batches: Sequence[int], device: torch.device,
              repeats: int = 10, warmup: int = 3, layers: bool = False, backend: str = "auto",
              seed: int = 0, on_step: Optional[Callable[[str], None]] = None) -> dict:
    """Time ``models`` (the first is the baseline) on random images; returns a JSON-ready dict."""
    if not models:
        raise VmqError("nothing to benchmark")
    if repeats < 1 or warmup < 0:
        raise VmqError(f"repeats must be >= 1 and warmup >= 0, got {repeats} and {warmup}")
    if not batches or min(batches) < 1:
        raise VmqError(f"batch sizes must be positive, got {list(batches)}")
    for bm in models:
        bm.model.eval().to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed)  # the same images on every device
    results = []
    breakdown = {}
    with torch.inference_mode(), use_backend(backend), contextlib.ExitStack() as stack:
        for bm in models:
            stack.enter_context(bm.context())
        for batch in batches:
            images = torch.randn(batch, 3, image_size, image_size, generator=gen, device="cpu").to(device)
            inputs = [images.to(bm.dtype) for bm in models]
            if on_step:
                on_step(f"batch {batch}: warm-up")
            for bm, x in zip(models, inputs):
                for _ in range(warmup):
                    bm.model(x)
            times: List[List[float]] = [[] for _ in models]
            for r in range(repeats):
                if on_step:
                    on_step(f"batch {batch}: repeat {r + 1}/{repeats}")
                order = list(range(len(models)))
                order = order[r % len(order):] + order[:r % len(order)]
                for i in order:
                    times[i].append(_forward_seconds(models[i].model, inputs[i]))
            row = {"batch": batch, "models": {}}
            base = statistics.median(times[0])
            for bm, x, t in zip(models, inputs, times):
                med = statistics.median(t)
                row["models"][bm.label] = {
                    "latency_ms": round(med * 1e3, 3),
                    "latency_min_ms": round(min(t) * 1e3, 3),
                    "images_per_sec": round(batch / med, 2),
                    "speedup": round(base / med, 3),
                    "peak_memory_mb": _peak_memory_mb(bm.model, x),
                }
            results.append(row)
            if layers:
                if on_step:
                    on_step(f"batch {batch}: per-layer pass")
                breakdown[str(batch)] = {bm.label: layer_times(bm.model, x, repeats)
                                         for bm, x in zip(models, inputs)}
    return {
        "device": str(device),
        "threads": torch.get_num_threads() if device.type == "cpu" else None,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "backend": backend,
        "image_size": image_size,
        "repeats": repeats,
        "warmup": warmup,
        "baseline": models[0].label,
        "models": {bm.label: {"dtype": str(bm.dtype).removeprefix("torch."), "weight_mb": round(weight_bytes(bm.model) / 2 ** 20, 3),
                              **bm.notes} for bm in models},
        "results": results,
        **({"layers": breakdown} if layers else {}),
    }


def parse_batches(text: str) -> List[int]:
    """``"1,8,64"`` -> ``[1, 8, 64]``, with a one-line error for anything else."""
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise VmqError(f"--batch takes comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise VmqError(f"--batch takes comma-separated positive integers, got {text!r}")
    return values
