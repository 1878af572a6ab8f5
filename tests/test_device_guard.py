"""Device mistakes caught on the CPU: what would break or stall a ``--device cuda`` run.

On a GPU, a tensor made without ``device=`` lands on the CPU and meets the model's CUDA tensors;
a value read on the host (``.item()``, ``bool(t)``, ``.nonzero()``, a boolean mask...) waits for
the GPU to finish everything queued. Neither shows on a CPU run, so :class:`DeviceGuard` (a
TorchFunctionMode, scoped to one ``with`` block) records, for calls made from vmq's own code:

* every tensor factory (``torch.zeros``, ``arange``, ``randperm``, ``tensor``...) given no
  ``device``: vmq names the device of every tensor it makes (``device="cpu"`` where the CPU is
  meant, e.g. random draws from a CPU generator);
* every host read of a tensor's values, by call site: the learning loops (JLSS, the VQ search)
  must not read any per step, so the counts do not grow with the number of steps.

Plus the scoped fp32 precision switch that GPU runs use (:func:`vmq.runtime.ieee_float32`).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import timm
import torch
from torch.overrides import TorchFunctionMode

import vmq
from vmq.calib import collect_stats
from vmq.compress.api import compress
from vmq.runtime import ieee_float32

VMQ_DIR = Path(vmq.__file__).resolve().parent

FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.arange, torch.linspace, torch.logspace, torch.eye,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.tensor, torch.as_tensor,
             torch.scalar_tensor, torch.empty_strided}
HOST_READS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
              torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
              torch.equal, torch.Tensor.equal, torch.masked_select, torch.Tensor.masked_select, torch.unique,
              torch.Tensor.unique}


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype == torch.bool for p in parts)


class DeviceGuard(TorchFunctionMode):
    """Records factory calls without ``device`` and host reads, made directly from vmq's code."""

    def __init__(self):
        super().__init__()
        self.factories = []  # "file:line function" of each factory call without a device
        self.host_reads = Counter()  # "file:line name" -> calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        frame = sys._getframe(1)
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(VMQ_DIR):
            where = f"{path.relative_to(VMQ_DIR.parent)}:{frame.f_lineno} {getattr(func, '__name__', func)}"
            if func in FACTORIES and kwargs.get("device") is None and not (
                    func in (torch.as_tensor, torch.tensor) and args and isinstance(args[0], torch.Tensor)):
                self.factories.append(where)
            if func in HOST_READS or (func is torch.Tensor.__getitem__ and _bool_index(args)):
                self.host_reads[where] += 1
        return func(*args, **kwargs)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return timm.create_model("test_vim").eval(), torch.randn(16, 3, 32, 32)


PTQ = {"quantization": {"method": "ptq4vm", "scheme": "W4A8", "jlss": {"iterations": 2, "batch_size": 4},
                        "truncation": {"num_images": 8, "grid": 10}},
       "calibration": {"batch_size": 8}, "eval": {"limit": 16, "batch_size": 8}}
VQ = {"vq": {"method": "vimvq", "codebook": {"dim": 2, "size": 8}, "kmeans": {"iterations": 3},
             "search": {"iterations": 6, "batch_size": 4}, "input_activations": {"num_bits": 8}},
      "calibration": {"batch_size": 8}, "eval": {"limit": 16, "batch_size": 8}}


@pytest.mark.parametrize("recipe", [PTQ, VQ], ids=["ptq4vm", "vimvq"])
def test_every_tensor_vmq_makes_names_its_device(tiny, recipe, tmp_path):
    """Calibration, compression (learning included), evaluation, packing and timing under the guard."""
    from vmq.bench import BenchModel, float_twin, run_bench
    from vmq.pack.format import load_packed, save_packed

    model, images = tiny
    with DeviceGuard() as guard:
        stats = collect_stats(model, images, 8)
        result = compress(recipe, model=model, images=images, stats=stats)
        save_packed(result.model, tmp_path / "packed.safetensors", {}, {})
    packed, _ = load_packed(tmp_path / "packed.safetensors")  # building a model happens on the CPU: outside
    twin = float_twin(packed)
    with guard:
        run_bench([BenchModel("fp32", twin), BenchModel("q", packed)], 32, [2], torch.device("cpu"), repeats=1,
                  warmup=0)
    assert not guard.factories, "tensors made without a device:\n" + "\n".join(sorted(set(guard.factories)))


def _host_reads(recipe: dict, model, images) -> Counter:
    stats = collect_stats(model, images, 8)
    with DeviceGuard() as guard:
        compress(recipe, model=model, images=images, stats=stats, evaluate_model=False)
    return guard.host_reads


@pytest.mark.parametrize("stage,key,steps", [("quantization", "jlss", (2, 6)), ("vq", "search", (6, 18))],
                         ids=["jlss", "vq-search"])
def test_learning_loops_read_nothing_on_the_host_per_step(stage, key, steps):
    """A host read per step would stall a GPU every step: the counts must not grow with the steps."""
    counts = []
    for n in steps:
        torch.manual_seed(0)
        model, images = timm.create_model("test_vim").eval(), torch.randn(16, 3, 32, 32)
        recipe = {**(PTQ if stage == "quantization" else VQ)}
        recipe[stage] = {**recipe[stage], key: {**recipe[stage][key], "iterations": n}}
        counts.append(_host_reads(recipe, model, images))
    grown = {site: (counts[0][site], counts[1][site]) for site in counts[0] | counts[1]
             if counts[0][site] != counts[1][site]}
    assert not grown, f"host reads that grow with the steps ({steps[0]} -> {steps[1]} steps): {grown}"


def test_ieee_float32_sets_and_restores_the_precision_switches():
    b = torch.backends

    def state():
        return (torch.get_float32_matmul_precision(), b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision,
                b.cudnn.rnn.fp32_precision, b.mkldnn.matmul.fp32_precision, b.cudnn.allow_tf32)

    before = state()
    try:
        for setup in (lambda: None, lambda: torch.set_float32_matmul_precision("high"),
                      lambda: (setattr(b.cudnn.conv, "fp32_precision", "tf32"), setattr(b.cudnn.rnn, "fp32_precision", "tf32"))):
            setup()
            outside = state()
            with ieee_float32("cpu"):
                assert state() == outside  # a no-op off CUDA
            with ieee_float32("cuda"):  # only switches: no CUDA device needed
                inside = state()
                with ieee_float32("cuda:0"):  # nested
                    assert state() == inside
                assert state() == inside
            assert inside[0] == "highest" and inside[1:4] == ("ieee",) * 3 and inside[5] is False
            assert state() == outside
    finally:
        torch.set_float32_matmul_precision(before[0])
        b.cudnn.allow_tf32 = before[5]
        b.cuda.matmul.fp32_precision, b.cudnn.conv.fp32_precision = before[1], before[2]
        b.cudnn.rnn.fp32_precision, b.mkldnn.matmul.fp32_precision = before[3], before[4]
    assert state() == before
