"""Options shared by several commands, and their checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

import click

if TYPE_CHECKING:
    import torch

    from vmq.activations import MemoryBudget


def model_options(f):
    f = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="Checkpoint (.pth official, plain state dict, or .safetensors), or 'random' for "
                          "--model with randomly initialised weights (seed 0).")(f)
    f = click.option("--model", "model_name", default=None,
                     help="Registered model name (default: the shipped reference model, or the one "
                          "whose keys fit --checkpoint).")(f)
    return f


def device_option(f):
    return click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]",
                        help="Where to run (the model, the images and the kernels).")(f)


def backend_option(f):
    return click.option("--backend", type=click.Choice(["auto", "cuda", "cpu", "ref"]), default="auto",
                        show_default=True,
                        help="Kernels: compiled vmq._C kernels for the device (cuda, cpu), the PyTorch reference "
                             "ops (ref), or auto (compiled where available, else reference).")(f)


def verify_option(f):
    return click.option("--no-verify", "no_verify", is_flag=True,
                        help="Load a packed file without checking its payload against the recorded SHA-256.")(f)
def memory_options(f):
    """``--max-memory`` and ``--offload-dir``: where the calibration activations are kept."""
    f = click.option("--offload-dir", type=click.Path(file_okay=False), default=None, metavar="DIR",
                     help="Folder for the block activations that do not fit --max-memory (files, removed at the "
                          "end, also after an error).")(f)
    f = click.option("--max-memory", default=None, metavar="SIZE",
                     help="Most memory the block activations (one block's inputs and outputs for all calibration "
                          "images) may take on the device, e.g. 8GB or 512MiB; the rest goes to --offload-dir, or "
                          "on CUDA to host memory. Default: no limit. The result does not depend on it.")(f)
    return f


def check_memory(max_memory: Optional[str], offload_dir: Optional[str], device: Union[str, "torch.device"]) \
        -> "MemoryBudget":
    """The :class:`vmq.activations.MemoryBudget` of the options, checked against ``device`` (one clear line)."""
    from vmq.activations import MemoryBudget

    budget = MemoryBudget.of(max_memory, offload_dir)
    budget.check(device)
    return budget


def check_device(device: str) -> None:
    """One clear line when the device is malformed or does not exist here."""
    from vmq.env import check_device as check

    check(device)


def _apply_threads(ctx: click.Context, param: click.Parameter, value):
    from vmq.runtime import set_threads

    if not ctx.resilient_parsing:  # (not while completing the shell's command line)
        set_threads(value)
    return value


def threads_option(f):
    """``--threads N``: torch's CPU threads, set as soon as the option is parsed (before the command runs)."""
    return click.option("--threads", type=click.IntRange(min=1), default=None, expose_value=False,
                        callback=_apply_threads, metavar="N",
                        help="CPU threads for the computation; default: OMP_NUM_THREADS when set, else the CPUs "
                             "this process may use (affinity mask and cgroup quota), shared among torchrun's "
                             "processes on the machine.")(f)
