"""Visual Mamba models, one file per family. Importing this package registers them in timm's registry."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from torch import nn

from vmq.errors import VmqError
from vmq.models import vim  # noqa: F401  (registers the Vim family and its models)
from vmq.models import vmamba  # noqa: F401  (registers the VMamba family and its models)
from vmq.models import local_vmamba  # noqa: F401  (registers the LocalVMamba family and its models)
from vmq.models import local_vim  # noqa: F401  (registers the LocalVim family and its models)
from vmq.models.checkpoint import read_state_dict
from vmq.models.family import FAMILIES, Fold, ModelFamily, family_of
from vmq.models.reference import REFERENCE_MODEL
from vmq.models.registry import (canonical_name, checkpoint_num_classes, config_for, create, entry_for, family_for, fitting_models,
                                 load_checkpoint, model_names, reference_models)

__all__ = ["REFERENCE_MODEL", "FAMILIES", "ModelFamily", "Fold", "create_model", "load_checkpoint", "read_state_dict",
           "model_names", "reference_models", "canonical_name", "config_for", "family_for", "family_of", "fitting_models"]


def create_model(name: Optional[str] = None, checkpoint: Union[str, Path, None] = None,
                 pretrained: bool = False) -> nn.Module:
    """Build a registered model, optionally loading a checkpoint, in eval mode.

    * no name, no checkpoint: the shipped reference model with its trained weights (a name with
      ``pretrained=True`` loads the weights shipped for that model; only the reference model has any);
    * a checkpoint without a name: the one registered model whose keys and shapes fit it;
    * a name and a checkpoint: that model, with ``num_classes`` taken from the checkpoint's head.
    """
    if name is None and checkpoint is None:
        name, pretrained = REFERENCE_MODEL, True
    if checkpoint is None:
        return create(name, pretrained=pretrained).eval()
    sd = read_state_dict(checkpoint)
    if name is None:
        fits = fitting_models(sd)
        if not fits:
            raise VmqError(f"{checkpoint}: no registered model fits its keys; pass --model")
        name = fits[0]
    entry = entry_for(name)
    head = checkpoint_num_classes(entry, sd)
    model = create(name, **({"num_classes": head} if head is not None else {}))
    load_checkpoint(model, checkpoint, entry.family, canonical_name(name), state_dict=sd)
    return model.eval()
