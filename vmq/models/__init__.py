"""Vision Mamba models. Importing this package registers them in timm's model registry."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from vmq.errors import VmqError
from vmq.models import registry
from vmq.models.checkpoint import fitting_models, load_checkpoint, read_state_dict
from vmq.models.registry import REFERENCE_MODEL, canonical_name, config_for, model_names
from vmq.models.vim import VimConfig, VisionMamba

__all__ = ["VimConfig", "VisionMamba", "REFERENCE_MODEL", "create_model", "load_checkpoint",
           "read_state_dict", "model_names", "canonical_name", "config_for", "fitting_models"]


def create_model(name: Optional[str] = None, checkpoint: Union[str, Path, None] = None,
                 pretrained: bool = False) -> VisionMamba:
    """Build a registered Vim, optionally loading a checkpoint.

    * no name, no checkpoint: the shipped reference model with its trained weights (a name with
      ``pretrained=True`` loads the shipped weights too, for the reference model only);
    * a checkpoint without a name: the one registered model whose keys and shapes fit it;
    * a name and a checkpoint: that model, with ``num_classes`` taken from the checkpoint's head.
    """
    import timm

    if name is None and checkpoint is None:
        name, pretrained = REFERENCE_MODEL, True
    sd = None
    if checkpoint is not None:
        sd = read_state_dict(checkpoint)
        if name is None:
            fits = fitting_models(sd)
            if not fits:
                raise VmqError(f"{checkpoint}: no registered Vim model fits its keys; pass --model")
            name = fits[0]
    config_for(name)  # raises a clear error for an unknown name
    kwargs = {}
    if sd is not None and "head.weight" in sd:
        kwargs["num_classes"] = int(sd["head.weight"].shape[0])
    model = timm.create_model(canonical_name(name), pretrained=pretrained and checkpoint is None, **kwargs)
    model.vmq_name = canonical_name(name)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint, model_name=name, state_dict=sd)
    return model.eval()
