"""Options shared by several commands, and their checks."""

from __future__ import annotations

import click

from vmq.errors import VmqError


def model_options(f):
    f = click.option("--checkpoint", type=click.Path(dir_okay=False), default=None,
                     help="Checkpoint (.pth official, plain state dict, or .safetensors).")(f)
    f = click.option("--model", "model_name", default=None,
                     help="Registered model name (default: the shipped reference model, or the one "
                          "whose keys fit --checkpoint).")(f)
    return f


def device_option(f):
    return click.option("--device", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
                        help="Where to run (the model, the images and the kernels).")(f)


def backend_option(f):
    return click.option("--backend", type=click.Choice(["auto", "cuda", "cpu", "ref"]), default="auto",
                        show_default=True,
                        help="Kernels: compiled vmq._C kernels for the device (cuda, cpu), the PyTorch reference "
                             "ops (ref), or auto (compiled where available, else reference).")(f)


def check_device(device: str) -> None:
    """One clear line when the device does not exist here."""
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise VmqError(f"--device {device}: no CUDA device is available (torch.cuda.is_available() is False)")
