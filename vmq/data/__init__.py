"""Evaluation data: ImageFolder trees (ImageNet layout) through timm, and the shipped sample set.

Transforms come from the model's pretrained cfg (``resolve_data_config`` + ``create_transform``),
as the official evaluation did.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vmq.errors import VmqError

SHIPPED_EVAL = "cifar10_test_lossless.npz"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")

__all__ = ["ArrayImageDataset", "shipped_eval_set", "folder_dataset", "eval_transform", "eval_loader"]


class ArrayImageDataset(Dataset):
    """Images held as a uint8 array (N, H, W, 3) with integer labels."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, class_names: Sequence[str] = (),
                 transform: Optional[Callable] = None):
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise VmqError(f"expected uint8 images of shape (N, H, W, 3), got {images.dtype} {images.shape}")
        if len(images) != len(labels):
            raise VmqError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels.astype(np.int64)
        self.class_names = list(class_names)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        img = Image.fromarray(self.images[i])
        return (self.transform(img) if self.transform else img), int(self.labels[i])


def shipped_eval_set(transform: Optional[Callable] = None) -> ArrayImageDataset:
    """The 1017 CIFAR-10 test images whose pixels are bit-exact originals (shipped in the package)."""
    path = resources.files("vmq.assets") / SHIPPED_EVAL
    with resources.as_file(path) as p, np.load(p, allow_pickle=False) as z:
        return ArrayImageDataset(z["images"], z["labels"], [str(c) for c in z["class_names"]], transform)


def _check_folder(root: Path) -> Path:
    """Return the folder whose subfolders are the classes (``root`` or its val/validation split)."""
    if not root.exists():
        raise VmqError(f"data folder not found: {root}")
    if not root.is_dir():
        raise VmqError(f"data path is not a folder: {root}")
    for split in ("val", "validation", "test"):
        if (root / split).is_dir():
            root = root / split
            break
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if not classes:
        if loose:
            raise VmqError(f"{root} holds images but no class subfolders: expected ImageNet layout "
                           f"({root}/<class>/<image>)")
        raise VmqError(f"{root} is empty: expected ImageNet layout ({root}/<class>/<image>)")
    if not any(f.suffix.lower() in IMAGE_EXTENSIONS for c in classes for f in c.rglob("*") if f.is_file()):
        raise VmqError(f"no images found under {root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return root


def folder_dataset(root: Union[str, Path], transform: Optional[Callable] = None):
    """An ImageNet-layout folder (``root/<class>/<image>``, or ``root/val/...``) through timm."""
    from timm.data import create_dataset

    root = _check_folder(Path(root))
    ds = create_dataset("", root=str(root), split="", is_training=False, transform=transform)
    ds.class_names = list(ds.reader.class_to_idx)
    return ds


def eval_transform(model: torch.nn.Module) -> Tuple[Callable, dict]:
    """The evaluation transform of ``model``'s pretrained cfg, and the resolved data config."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=model)
    return create_transform(**cfg, is_training=False), cfg


def eval_loader(model: torch.nn.Module, data: Union[str, Path, None] = None, batch_size: int = 64,
                limit: Optional[int] = None, workers: int = 0) -> Tuple[DataLoader, dict, List[str]]:
    """A loader over ``data`` (a folder; the shipped set when None) with ``model``'s transform."""
    transform, cfg = eval_transform(model)
    ds = shipped_eval_set(transform) if data is None else folder_dataset(data, transform)
    num_classes = getattr(model, "num_classes", None)
    if num_classes and len(ds.class_names) > num_classes:
        raise VmqError(f"the data has {len(ds.class_names)} classes but the model predicts {num_classes}")
    if limit is not None:
        if limit < 1:
            raise VmqError(f"--limit must be at least 1, got {limit}")
        ds = torch.utils.data.Subset(ds, range(min(limit, len(ds))))
        ds.class_names = ds.dataset.class_names
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers)
    return loader, cfg, ds.class_names
