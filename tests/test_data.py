"""Evaluation data: the shipped set and ImageNet-layout folders through timm."""

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vmq.models  # noqa: F401
from vmq.data import (calibration_images, eval_loader, eval_transform, folder_dataset, shipped_calibration_set,
                      shipped_eval_set, spread_order)
from vmq.errors import VmqError


def test_shipped_set():
    ds = shipped_eval_set()
    assert len(ds) == 1017
    assert ds.class_names[:2] == ["airplane", "automobile"] and len(ds.class_names) == 10
    img, label = ds[0]
    assert img.size == (32, 32) and label == 3  # CIFAR-10 test image 0 is a cat


def _write_folder(root, n=24):
    ds = shipped_eval_set()
    for i in range(n):
        cls = ds.class_names[ds.labels[i]]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i]).save(root / cls / f"{i:04d}.png")
    return ds


def test_folder_matches_shipped_arrays(tmp_path):
    ds = _write_folder(tmp_path / "val")
    model = timm.create_model("test_vim").eval()
    loader, cfg, classes = eval_loader(model, tmp_path, batch_size=8)
    assert cfg["input_size"] == (3, 32, 32)
    assert classes == sorted(classes) and set(classes) <= set(ds.class_names)
    batch = next(iter(loader))
    assert batch.images.shape == (8, 3, 32, 32) and batch.indices.tolist() == list(range(8)) and not batch.errors
    # every folder image equals the shipped image it was written from, label included
    folder = loader.dataset.base
    shipped = shipped_eval_set(folder.transform)
    for k in range(len(folder)):
        x, y = folder[k]
        idx = int(folder.filename(k, basename=True).split(".")[0])
        x_ref, y_ref = shipped[idx]
        torch.testing.assert_close(x, x_ref)
        assert y == y_ref  # label numbers follow the model's classes, even with classes missing
    assert len({y for _, y in folder}) < 10  # the 24 images lack some classes


def test_batches_hold_the_per_image_transform_bits(tmp_path):
    # the workers stop at uint8 tensors and the batch is normalised at once: the same bits as the
    # full per-image transform, for images that need resizing and cropping (and a grey one) too
    rng = np.random.default_rng(0)
    sizes = [(32, 32), (40, 37), (29, 50), (64, 64), (33, 31)]
    (tmp_path / "cat").mkdir()
    for i, (h, w) in enumerate(sizes):
        img = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        (img.convert("L") if i == 4 else img).save(tmp_path / "cat" / f"{i}.png")
    model = timm.create_model("test_vim").eval()
    full, _ = eval_transform(model)
    for data in (tmp_path, None):
        loader, _, _ = eval_loader(model, data, batch_size=4, limit=None if data else 9, workers=0)
        got = torch.cat([b.images for b in loader])
        base = loader.dataset
        if data is None:
            expected = torch.stack([full(Image.fromarray(base.base.images[k])) for k in base.indices])
        else:
            expected = torch.stack([full(Image.open(tmp_path / "cat" / f"{i}.png").convert("RGB"))
                                    for i in range(len(sizes))])
        assert got.dtype == torch.float32 and torch.equal(got, expected)


def test_unknown_class_folder(tmp_path):
    (tmp_path / "airplane").mkdir()
    (tmp_path / "spaceship").mkdir()
    for c in ("airplane", "spaceship"):
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / c / "x.png")
    with pytest.raises(VmqError, match="class folders spaceship are not among the model's 10 classes"):
        eval_loader(timm.create_model("test_vim"), tmp_path)


def test_broken_image_is_an_error(tmp_path):
    (tmp_path / "cat").mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "cat" / "a.png")
    (tmp_path / "cat" / "b.png").write_bytes(b"not a png")
    ds = folder_dataset(tmp_path)
    ds[0]
    with pytest.raises(VmqError, match="cannot read image .*b.png"):
        ds[1]


def test_limit_spreads_over_classes():
    loader, _, _ = eval_loader(timm.create_model("test_vim"), None, limit=50)
    idx = loader.dataset.indices
    assert len(idx) == 50 and idx[0] == 0 and idx[-1] == 1016


def test_transform_is_deterministic_and_normalised():
    model = timm.create_model("test_vim")
    loader, cfg, _ = eval_loader(model, None, batch_size=4, limit=4)
    x = next(iter(loader)).images
    raw = torch.from_numpy(shipped_eval_set().images[loader.dataset.indices]).permute(0, 3, 1, 2).float() / 255
    mean, std = torch.tensor(cfg["mean"]).view(1, 3, 1, 1), torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std, atol=1e-5, rtol=0)


def test_bad_folders(tmp_path):
    with pytest.raises(VmqError, match="not found"):
        folder_dataset(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(VmqError, match="is empty"):
        folder_dataset(empty)
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(flat / "a.png")
    with pytest.raises(VmqError, match="no class subfolders"):
        folder_dataset(flat)
    noimg = tmp_path / "noimg" / "cat"
    noimg.mkdir(parents=True)
    (noimg / "readme.txt").write_text("x")
    with pytest.raises(VmqError, match="no images found"):
        folder_dataset(tmp_path / "noimg")


def test_more_classes_than_model(tmp_path):
    for name in ("airplane", "bird", "cat", "dog"):
        (tmp_path / name).mkdir()
        Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / name / "x.png")
    with pytest.raises(VmqError, match="4 classes but the model predicts 3"):
        eval_loader(timm.create_model("test_vim", num_classes=3), tmp_path)


def test_spread_order_spans_every_stretch():
    for n in (1, 2, 7, 256, 1000):
        order = spread_order(n)
        assert sorted(order) == list(range(n))
    order = spread_order(256)
    for lo in range(0, 256 - 32 + 1, 8):  # any 32 consecutive entries: one in each eighth of the range
        assert {k * 8 // 256 for k in order[lo:lo + 32]} == set(range(8))


def test_calibration_images_from_a_class_sorted_folder_span_the_classes_in_every_batch(tmp_path):
    # ImageNet layout lists images class by class; calibration takes 40 of 80 evenly spaced, and
    # each batch of 8 (the first one: a short activation search's images) and the last 10 (JLSS's
    # held-out images) hold images of many classes, not of one or two
    colour = {}
    for c in range(8):
        (tmp_path / "train" / f"class{c}").mkdir(parents=True)
        for j in range(10):
            img = np.full((32, 32, 3), 30 * c + j, dtype=np.uint8)  # the pixel value says class and image
            Image.fromarray(img).save(tmp_path / "train" / f"class{c}" / f"{j:02d}.png")
            colour[30 * c + j] = c
    model = timm.create_model("test_vim").eval()
    transform, _ = eval_transform(model)
    images, _ = calibration_images(model, tmp_path, 40)
    ref = {v: transform(Image.fromarray(np.full((32, 32, 3), v, dtype=np.uint8)))[0, 0, 0].item() for v in colour}
    # each image is one grey level: find it among the transformed levels
    labels = [colour[min(ref, key=lambda v: abs(ref[v] - img[0, 0, 0].item()))] for img in images]
    assert len(labels) == 40 and sorted(set(labels)) == list(range(8))
    assert all(labels.count(c) == 5 for c in range(8))  # evenly spaced: 5 of each class's 10
    for lo in range(0, 40, 8):  # (taken in file order, a batch would hold one or two classes)
        batch = labels[lo:lo + 8]
        assert len(set(batch)) >= 5 and max(batch.count(c) for c in batch) <= 2, labels
    assert len(set(labels[-10:])) >= 7, labels
    shard, _ = calibration_images(model, tmp_path, 40, slice(8, 24))
    assert torch.equal(shard, images[8:24])
