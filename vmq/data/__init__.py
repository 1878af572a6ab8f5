"""Evaluation data: ImageFolder trees (ImageNet layout) through timm, and the shipped sample set.

Transforms come from the model's pretrained cfg (``resolve_data_config`` + ``create_transform``),
as the official evaluation did.

:func:`eval_loader` streams an evaluation set: worker processes read, decode and transform the
images (``workers``; by default :func:`vmq.cpus.default_workers` for a folder), at most two
batches per worker in flight, in the set's order. Per image the workers go only as far as a
uint8 tensor (decode, resize, crop); the conversion to float and the normalisation run once per
batch (:class:`BatchNormalize`, the same bits as per image, for a fraction of the cost). Each batch is an :class:`EvalBatch`: the
images that decoded, their labels and positions in the set, and one error line (naming the
file) per image that did not, which :func:`vmq.evaluate.evaluate` stops on or skips and counts.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path
from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple, Union

import os

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from vmq.cpus import default_workers
from vmq.errors import VmqError
from vmq.models.registry import reference_models

SHIPPED_EVAL = "cifar10_test_lossless.npz"
SHIPPED_CALIB = "cifar10_train_calib.npz"
_GOLDEN = (5 ** 0.5 - 1) / 2

__all__ = ["ArrayImageDataset", "FolderDataset", "EvalSet", "EvalSample", "EvalBatch", "BatchNormalize",
           "collate_eval", "shipped_eval_set", "folder_dataset", "model_label_names", "eval_transform",
           "eval_transform_split", "eval_loader",
           "shipped_calibration_set", "calibration_images"]


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


def _shipped(name: str, transform: Optional[Callable]) -> ArrayImageDataset:
    path = resources.files("vmq.assets") / name
    with resources.as_file(path) as p, np.load(p, allow_pickle=False) as z:
        return ArrayImageDataset(z["images"], z["labels"], [str(c) for c in z["class_names"]], transform)


def shipped_eval_set(transform: Optional[Callable] = None) -> ArrayImageDataset:
    """The 1017 CIFAR-10 test images whose pixels are bit-exact originals (shipped in the package)."""
    return _shipped(SHIPPED_EVAL, transform)


def shipped_calibration_set(transform: Optional[Callable] = None) -> ArrayImageDataset:
    """512 CIFAR-10 training images (bit-exact originals), the reference model's calibration set."""
    return _shipped(SHIPPED_CALIB, transform)


def _image_extensions() -> Tuple[str, ...]:
    from timm.data import get_img_extensions

    return tuple(get_img_extensions())


EVAL_SPLITS = ("val", "validation", "test")
TRAIN_SPLITS = ("train", "training")


def _check_folder(root: Path, splits: Sequence[str] = EVAL_SPLITS) -> Tuple[Path, List[str]]:
    """The folder whose subfolders are the classes (``root`` or its split named in ``splits``), and them.

    A root holding splits of the other kind only (e.g. ``val/`` when a training split is
    wanted) is refused, so calibration never silently reads evaluation images.
    """
    if not root.exists():
        raise VmqError(f"data folder not found: {root}")
    if not root.is_dir():
        raise VmqError(f"data path is not a folder: {root}")
    _check_readable(root)
    for split in splits:
        if (root / split).is_dir():
            root = root / split
            break
    else:
        others = [s for s in EVAL_SPLITS + TRAIN_SPLITS if s not in splits and (root / s).is_dir()]
        if others:
            want = "training" if splits == TRAIN_SPLITS else "evaluation"
            raise VmqError(f"{root} has a {others[0]}/ split but no {want} split ({'/, '.join(splits)}/); "
                           f"point at the {want} images")
    _check_readable(root)
    exts = _image_extensions()
    entries = _entries(root)
    classes = sorted(p for p in entries if p.is_dir() and not p.name.startswith("."))
    loose = [p for p in entries if p.is_file() and p.suffix.lower() in exts]
    for c in classes:
        _check_readable(c)
    if not classes:
        if loose:
            raise VmqError(f"{root} holds images but no class subfolders: expected ImageNet layout "
                           f"({root}/<class>/<image>)")
        raise VmqError(f"{root} is empty: expected ImageNet layout ({root}/<class>/<image>)")
    if not any(f.suffix.lower() in exts for c in classes for f in c.rglob("*") if f.is_file()):
        raise VmqError(f"no images found under {root} (looked for {', '.join(exts)})")
    return root, [c.name for c in classes]


def _check_readable(folder: Path) -> None:
    """A folder that cannot be listed or entered is an error naming it (os.walk would skip it silently)."""
    if not os.access(folder, os.R_OK | os.X_OK):
        raise VmqError(f"cannot read data folder {folder}: permission denied")


def _entries(folder: Path) -> List[Path]:
    try:
        return list(folder.iterdir())
    except OSError as exc:
        raise VmqError(f"cannot read data folder {folder}: {exc.strerror or exc}") from None


class FolderDataset(Dataset):
    """An ImageNet-layout folder read through timm's folder reader.

    Labels follow ``label_names`` (the model's classes) when given, so a folder that lacks some
    classes still gets the right label numbers; otherwise the sorted folder names. An image that
    cannot be decoded is an error naming the file (it is never skipped silently).
    """

    def __init__(self, root: Union[str, Path], transform: Optional[Callable] = None,
                 label_names: Optional[Sequence[str]] = None, splits: Sequence[str] = EVAL_SPLITS):
        from timm.data import create_dataset

        root, classes = _check_folder(Path(root), splits)
        if label_names is not None:
            index = {name: i for i, name in enumerate(label_names)}
            unknown = [c for c in classes if c not in index]
            if unknown:
                shown = ", ".join(unknown[:3]) + (" ..." if len(unknown) > 3 else "")
                raise VmqError(f"{root}: class folders {shown} are not among the model's {len(label_names)} "
                               f"classes (which are named like {', '.join(list(label_names)[:3])})")
            class_map = {c: index[c] for c in classes}
            self.class_names = list(label_names)
        else:
            class_map = {c: i for i, c in enumerate(classes)}
            self.class_names = classes
        self.root = root
        self.reader = create_dataset("", root=str(root), split="", is_training=False, class_map=class_map).reader
        self.transform = transform

    def __len__(self) -> int:
        return len(self.reader)

    def filename(self, index: int, basename: bool = False) -> str:
        return self.reader.filename(index, basename=basename)

    def __getitem__(self, index: int):
        from PIL import Image, UnidentifiedImageError

        path, target = self.reader.samples[index]
        try:
            with open(path, "rb") as f:
                img = Image.open(f).convert("RGB")
        except UnidentifiedImageError:
            why = "empty file (0 bytes)" if _size(path) == 0 else "not an image PIL can decode"
            raise VmqError(f"cannot read image {path}: {why}") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise VmqError(f"cannot read image {path}: {why}") from None
        return (self.transform(img) if self.transform else img), int(target)


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def folder_dataset(root: Union[str, Path], transform: Optional[Callable] = None,
                   label_names: Optional[Sequence[str]] = None) -> FolderDataset:
    """An ImageNet-layout folder (``root/<class>/<image>``, or ``root/val/...``)."""
    return FolderDataset(root, transform, label_names)


def model_label_names(model: torch.nn.Module) -> Optional[List[str]]:
    """The class names of ``model``'s pretrained cfg, when they match its number of classes."""
    names = (getattr(model, "pretrained_cfg", None) or {}).get("label_names")
    if names and len(names) == getattr(model, "num_classes", -1):
        return list(names)
    return None


def eval_transform(model: torch.nn.Module) -> Tuple[Callable, dict]:
    """The evaluation transform of ``model``'s pretrained cfg, and the resolved data config."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=model)
    return create_transform(**cfg, is_training=False), cfg


def eval_transform_split(model: torch.nn.Module) -> Tuple[Callable, BatchNormalize, dict]:
    """:func:`eval_transform` in two parts: per image, up to a uint8 tensor (resize and crop, as
    timm's loader with a prefetcher does); per batch, the float conversion and normalisation
    (:class:`BatchNormalize`). Together they give the same bits as :func:`eval_transform`."""
    from timm.data import create_transform, resolve_data_config

    cfg = resolve_data_config(model=model)
    return create_transform(**cfg, is_training=False, use_prefetcher=True), BatchNormalize(cfg["mean"], cfg["std"]), cfg


class EvalSample(NamedTuple):
    """One item of an :class:`EvalSet`: the image and its label, or the error that replaced them."""

    image: Optional[Tensor]
    label: int
    index: int  # position in the evaluation set
    error: Optional[str]  # one line naming the file, when it could not be read


class EvalBatch(NamedTuple):
    """A batch of :func:`eval_loader`: the images that were read, and an error line for each that was not."""

    images: Optional[Tensor]  # (n, C, H, W); None when no image of the batch was read
    labels: Tensor  # (n,)
    indices: Tensor  # (n,) positions in the evaluation set
    errors: List[str]


class BatchNormalize:
    """The eval transform's last two steps, to float in [0, 1] and normalising by ``mean`` and
    ``std``, on a batch of uint8 images (N, C, H, W) at once.

    The same elementwise arithmetic as the per-image steps (torchvision's ``to_tensor``, then
    ``normalize``: divide by 255, subtract the mean, divide by the std, in float32), so the same
    bits, for one vectorised operation per batch instead of two Python-level ones per image."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        self.mean = torch.tensor(mean, dtype=torch.float32, device="cpu").view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device="cpu").view(-1, 1, 1)

    def __call__(self, images: Tensor) -> Tensor:
        return images.to(torch.float32).div(255).sub_(self.mean).div_(self.std)


def collate_eval(samples: Sequence[EvalSample], finish: Optional[Callable[[Tensor], Tensor]] = None) -> EvalBatch:
    """The :class:`EvalBatch` of some samples (runs in the loader's workers); ``finish`` is applied
    to the stacked images (a :class:`BatchNormalize` for uint8 images)."""
    good = [s for s in samples if s.error is None]
    images = torch.stack([s.image for s in good]) if good else None
    if images is not None and finish is not None:
        images = finish(images)
    return EvalBatch(images, torch.tensor([s.label for s in good], dtype=torch.int64, device="cpu"),
                     torch.tensor([s.index for s in good], dtype=torch.int64, device="cpu"),
                     [s.error for s in samples if s.error])


class EvalSet(Dataset):
    """The images an evaluation runs over: ``base`` at ``indices`` (all of it by default), in order.

    Items are :class:`EvalSample`; an image the base cannot read (a :class:`VmqError` naming the
    file) becomes a sample holding that error, so that a loader's worker hands it over rather
    than failing, and the evaluation decides (stop, or skip and count)."""

    def __init__(self, base: Dataset, indices: Optional[Sequence[int]] = None):
        self.base = base
        self.indices = list(range(len(base))) if indices is None else list(indices)
        self.class_names = list(getattr(base, "class_names", []))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> EvalSample:
        try:
            image, label = self.base[self.indices[i]]
        except VmqError as exc:
            return EvalSample(None, -1, i, str(exc))
        return EvalSample(image, int(label), i, None)

    def filename(self, i: int) -> str:
        """The file of item ``i`` (relative to the folder), or ``#<index>`` for in-memory images."""
        if isinstance(self.base, FolderDataset):
            return self.base.filename(self.indices[i])
        return f"#{self.indices[i]}"


def eval_loader(model: torch.nn.Module, data: Union[str, Path, None] = None, batch_size: int = 64,
                limit: Optional[int] = None, workers: Optional[int] = None,
                pin_memory: bool = False) -> Tuple[DataLoader, dict, List[str]]:
    """A loader of :class:`EvalBatch` over ``data`` (a folder; the shipped set when None) with
    ``model``'s transform, in the set's order.

    ``workers`` processes read and decode the images (default: :func:`vmq.cpus.default_workers`
    for a folder, none for the in-memory shipped set); they stay up while the loader lives
    (a second pass reuses them) and keep two batches each ready. ``pin_memory`` for a GPU."""
    transform, normalize, cfg = eval_transform_split(model)
    ds = shipped_eval_set(transform) if data is None else folder_dataset(data, transform, model_label_names(model))
    num_classes = getattr(model, "num_classes", None)
    if num_classes and len(ds.class_names) > num_classes:
        raise VmqError(f"the data has {len(ds.class_names)} classes but the model predicts {num_classes}")
    class_names = ds.class_names
    indices = None
    if limit is not None:
        if limit < 1:
            raise VmqError(f"--limit must be at least 1, got {limit}")
        # evenly spaced over the (class-sorted) set, so that a limit still covers every class
        indices = _evenly_spaced(len(ds), limit)
    if workers is None:
        workers = 0 if data is None else default_workers()
    if workers < 0:
        raise VmqError(f"--workers must be at least 0, got {workers}")
    evalset = EvalSet(ds, indices)
    workers = min(workers, max(1, -(-len(evalset) // batch_size)))  # no more workers than batches
    loader = DataLoader(evalset, batch_size=batch_size, shuffle=False, num_workers=workers,
                        collate_fn=functools.partial(collate_eval, finish=normalize),
                        pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None)
    return loader, cfg, class_names


def _evenly_spaced(n: int, k: int) -> List[int]:
    if k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)})


def spread_order(n: int) -> List[int]:
    """A permutation of ``range(n)`` whose every prefix and every run of consecutive entries is
    spread evenly over ``range(n)``: entry ``k`` is the rank of ``frac(k x golden ratio)`` among
    the ``n`` such fractions (a Kronecker low-discrepancy sequence, as integers)."""
    keys = [(k * _GOLDEN) % 1.0 for k in range(n)]
    order = [0] * n
    for rank, k in enumerate(sorted(range(n), key=keys.__getitem__)):
        order[k] = rank
    return order


def calibration_images(model: torch.nn.Module, data: Union[str, Path, None], num_images: int,
                       shard: Optional[slice] = None) -> Tuple[Tensor, str]:
    """``num_images`` calibration images (N, 3, H, W) with ``model``'s eval transform, and their source.

    With no folder, the shipped calibration set is used, which exists only for the reference
    model. Images are taken evenly spaced over the (class-sorted) set, so every class is seen,
    and in :func:`spread_order`, so that every stretch of them spans the classes too: the first
    images (the activation search's, when it looks at fewer), each calibration batch and the last
    batches (JLSS's held-out images) sample the whole set, not a few of its classes.
    ``shard``: only those of the ``num_images`` (a process's share under torch.distributed).
    """
    transform, _ = eval_transform(model)
    if data is None:
        if getattr(model, "vmq_name", None) not in reference_models():
            raise VmqError(f"calibration needs a data folder (calibration.data / --data): vmq ships "
                           f"calibration images only for its reference models ({', '.join(reference_models())})")
        ds, source = shipped_calibration_set(transform), "(shipped CIFAR-10 training subset)"
    else:  # labels are not used: any class folder names will do
        ds = FolderDataset(data, transform, None, splits=TRAIN_SPLITS)
        source = str(ds.root)
    if len(ds) < num_images:
        raise VmqError(f"calibration asks for {num_images} images but {source} holds only {len(ds)}")
    chosen = _evenly_spaced(len(ds), num_images)
    ordered = [chosen[k] for k in spread_order(len(chosen))]
    images = torch.stack([ds[i][0] for i in ordered[shard or slice(None)]])
    return images, source
