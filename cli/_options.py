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
                        help="Where to run.")(f)


def backend_option(f):
    return click.option("--backend", type=click.Choice(["auto", "cuda", "cpu", "ref"]), default="auto",
                        show_default=True,
                        help="Kernels: compiled vmq._C kernels for the device (cuda, cpu), the PyTorch reference "
                             "ops (ref), or auto (compiled where available, else reference).")(f)


def check_device(device: str) -> None:
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise VmqError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")


def load_model(model_name, checkpoint):
    from vmq.models import REFERENCE_MODEL, canonical_name, config_for, create_model
    from vmq.pack.format import is_packed

    if checkpoint is not None and is_packed(checkpoint):
        raise VmqError(f"{checkpoint} is a vmq packed (quantized) file, not a floating-point checkpoint; "
                       f"evaluate it with `vmq eval {checkpoint}`")
    if model_name is not None:
        config_for(model_name)
        if checkpoint is None and canonical_name(model_name) != REFERENCE_MODEL:
            raise VmqError(f"--model {model_name} needs --checkpoint: vmq ships weights only for {REFERENCE_MODEL}")
    return create_model(model_name, checkpoint, pretrained=checkpoint is None)
