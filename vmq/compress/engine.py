"""The compression engine: one method applied to a model block by block (the gptq habit).

For each block, in order:

1. the floating-point block runs on the floating-point inputs: its output is the target;
2. if the block holds targets, the method replaces them by learnable layers and initialises them
   (:meth:`~vmq.compress.methods.base.Method.prepare`), then learns (``fit``);
3. the layers freeze into runtime layers (:mod:`vmq.layers`), and each layer's output SNR
   against its floating-point output is measured on what the compressed model feeds it;
4. the method finishes the block (e.g. folds smoothing scales) and reports per layer;
5. the compressed block runs on the compressed inputs, giving the next block's inputs.

The model's family (:mod:`vmq.models.family`) says what the blocks are and how they run; the
method says what happens to the layers. Everything runs on the model's device (on CUDA in full
fp32, :func:`vmq.runtime.ieee_float32`, so that a GPU run follows a CPU run to fp32 rounding).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, List, Optional

import torch
from torch import Tensor, nn

from vmq.calib import CalibStats
from vmq.compress.methods.base import BlockJob, Method
from vmq.errors import VmqError
from vmq.metrics import snr_db
from vmq.models.family import family_of, io_finite
from vmq.runtime import ieee_float32

SNR_IMAGES = 32


def compress_model(model: nn.Module, method: Method, images: Tensor, stats: CalibStats, batch_size: int = 32,
                   seed: int = 0, on_block: Optional[Callable[[int, int, str], None]] = None) -> List[Any]:
    """Compress ``model`` in place (its target layers become runtime layers); per-layer reports."""
    family = family_of(model)
    targets = method.targets(model, family)
    missing = [t for t in targets if t not in stats.layers]
    if missing:
        raise VmqError(f"the calibration stats have no entry for {missing[0]}")
    model.eval()  # no drop-path while compressing
    device = next(model.parameters()).device
    scan = family.scan_implementation(model, method.scan) if method.scan else contextlib.nullcontext()
    reports: List[Any] = []
    with scan, torch.no_grad(), ieee_float32(device):
        fp_io = family.embed_batched(model, images.to(device), batch_size)
        q_io = fp_io
        blocks = family.blocks(model)
        for i, (prefix, block) in enumerate(blocks):
            names = [t[len(prefix):] for t in targets if t.startswith(prefix)]
            fp_out = family.run_batched(block, fp_io, batch_size)
            if names:
                job = BlockJob(family, i, prefix, block, names, q_io, fp_out, stats, batch_size, seed + i)
                reports.extend(_compress_block(method, job))
            q_io = family.run_batched(block, q_io, batch_size) if names or q_io is not fp_io else fp_out
            if not io_finite(q_io):
                raise VmqError(f"{method.what} block {i} produced NaN or Inf")
            fp_io = fp_out
            if on_block is not None:
                on_block(i + 1, len(blocks), prefix)
    return reports


def _compress_block(method: Method, job: BlockJob) -> List[Any]:
    start = time.perf_counter()
    layers = method.prepare(job)
    info = method.fit(job, layers)
    info["seconds"] = time.perf_counter() - start
    frozen = {name: q.freeze() for name, q in layers.items()}
    job.install(frozen)
    # output SNR of each layer against its floating-point output, on what the compressed model feeds it
    seen = job.observe(job.names, SNR_IMAGES)
    snrs = {name: snr_db(layers[name].float_forward(x), frozen[name](x)) for name, x in seen.items()}
    method.finish(job, layers, frozen, info)
    return [method.report(job, name, layers[name], frozen[name], snrs[name], info) for name in job.names]


__all__ = ["compress_model", "SNR_IMAGES"]
