"""The compression engine: one method applied to a model block by block (the gptq habit).

For each block, in order:

1. the floating-point block runs on the floating-point inputs: its output is the target;
2. if the block holds targets, the method replaces them by learnable layers and initialises them
   (:meth:`~vmq.compress.methods.base.Method.prepare`), then learns (``fit``);
3. the layers freeze into runtime layers (:mod:`vmq.layers`), and each layer's output SNR
   against its floating-point output is measured on what the compressed model feeds it;
4. the method finishes the block (e.g. folds smoothing scales) and reports per layer;
5. the compressed block runs on the compressed inputs, giving the next block's inputs;
6. with a progress store (:mod:`vmq.progress`), the block is recorded (:mod:`vmq.compress.resume`).
   A resumed run rebuilds the recorded blocks instead of steps 2-4, and runs them as in step 5.

The model's family (:mod:`vmq.models.family`) says what the blocks are and how they run; the
method says what happens to the layers. Everything runs on the model's device (on CUDA in full
fp32, :func:`vmq.runtime.ieee_float32`, so that a GPU run follows a CPU run to fp32 rounding).
One block's activations are held at a time, where ``store`` (:class:`vmq.activations.ActivationStore`)
places them: on the device within a memory budget, past it in host memory or offload files.

Under torch.distributed (``part``), ``images`` are this process's shard of the calibration set:
every block's inputs and outputs stay sharded, the methods reduce what they measure
(:class:`~vmq.compress.methods.base.BlockJob`), and each compressed block's state is then
broadcast from rank 0, so that every process goes on with the very same weights.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from vmq.activations import ActivationStore, io_all_finite
from vmq.calib import CalibStats
from vmq.compress.methods.base import BlockJob, Method
from vmq.compress.resume import block_record, restore_block
from vmq.distributed import Part
from vmq.errors import VmqError
from vmq.metrics import snr_db
from vmq.models.family import BlockIO, ModelFamily, family_of
from vmq.progress import ProgressStore
from vmq.runtime import ieee_float32

SNR_IMAGES = 32


def compress_model(model: nn.Module, method: Method, images: Tensor, stats: CalibStats, batch_size: int = 32,
                   seed: int = 0, on_block: Optional[Callable[[int, int, str], None]] = None,
                   store: Optional[ActivationStore] = None, part: Optional[Part] = None,
                   progress: Optional[ProgressStore] = None) -> List[Any]:
    """Compress ``model`` in place (its target layers become runtime layers); per-layer reports.

    ``store``: where the block activations are kept (default: all on the model's device);
    ``part``: which images of the calibration set ``images`` are (default: all of them);
    ``progress``: record each finished block there (rank 0 writes under torch.distributed), and
    take the blocks it already holds."""
    part = part if part is not None else Part.whole(int(images.shape[0]), batch_size)
    family = family_of(model)
    targets = method.targets(model, family)
    missing = [t for t in targets if t not in stats.layers]
    if missing:
        raise VmqError(f"the calibration stats have no entry for {missing[0]}")
    model.eval()  # no drop-path while compressing
    device = next(model.parameters()).device
    scan = family.scan_implementation(model, method.scan) if method.scan else contextlib.nullcontext()
    store = store if store is not None else ActivationStore(device)
    reports: List[Any] = []
    with scan, torch.no_grad(), ieee_float32(device):
        blocks = family.blocks(model)
        fp_logits = _logits(model, images, batch_size, device) if method.needs_logits() else None
        fp_io = store.embed(family, model, images, batch_size)
        q_io = fp_io
        done = progress.done if progress is not None else 0
        for i, (prefix, block) in enumerate(blocks):
            names = [t[len(prefix):] for t in targets if t.startswith(prefix)]
            same = q_io is fp_io
            fp_out = store.run(family, block, fp_io, batch_size)
            fp_io = None  # (drops the floating-point inputs unless they are also the compressed ones)
            block_reports: List[Any] = []
            if i < done:  # finished before an interruption
                block_reports = restore_block(block, *progress.load_block(i), method, f"{progress.folder} block {i}")
            elif names:
                job = BlockJob(family, i, prefix, block, names, q_io, fp_out, stats, batch_size, seed + i, store,
                               part, _tail(model, family, blocks[i + 1:]) if fp_logits is not None else None,
                               fp_logits)
                block_reports = _compress_block(method, job)
                del job
                part.dist.broadcast_tensors(list(block.state_dict().values()))
            reports.extend(block_reports)
            q_io = store.run(family, block, q_io, batch_size) if names or not same else fp_out
            if not part.dist.all_true(io_all_finite(q_io)):
                raise VmqError(f"{method.what} block {i} produced NaN or Inf")
            if progress is not None and i >= done:
                progress.save_block(i, *block_record(block, block_reports))
            fp_io = fp_out
            del fp_out
            if on_block is not None:
                on_block(i + 1, len(blocks), prefix)
    return reports


def _logits(model: nn.Module, images: Tensor, batch_size: int, device: torch.device) -> Tensor:
    """The model's logits on ``images`` (anywhere), in batches on ``device``."""
    return torch.cat([model(images[i:i + batch_size].to(device)) for i in range(0, images.shape[0], batch_size)])


def _tail(model: nn.Module, family: ModelFamily, rest: List[Tuple[str, nn.Module]]) -> Callable[[BlockIO], Tensor]:
    """Logits from a block's output through the blocks ``rest`` and the head."""
    def tail(io: BlockIO) -> Tensor:
        for _, block in rest:
            io = family.run_block(block, io)
        return family.head(model, io)
    return tail


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
