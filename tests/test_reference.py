"""The shipped reference model: weights in the package, accuracy as its model card states."""

import io
import json
from importlib import resources

import numpy as np
import pytest
import torch

from tests.conftest import SHARED
from vmq.data import eval_loader
from vmq.evaluate import evaluate
from vmq.models import create_model
from vmq.models.reference import REFERENCE_MODEL, REFERENCE_WEIGHTS
from vmq.models.registry import shipped_weights



@pytest.fixture(scope="module")
def card():
    path = resources.files("vmq.assets") / "vim_ref_cifar10.json"
    assert path.is_file(), "the reference model's metrics file is missing from vmq/assets"
    return json.loads(path.read_text())


def test_weights_are_shipped_and_small():
    path = shipped_weights("vim_ref_cifar10")
    assert REFERENCE_MODEL == "vim_ref_cifar10"
    assert path.is_file() and path.name == REFERENCE_WEIGHTS
    assert path.stat().st_size <= 10 * 2**20
    eval_set = resources.files("vmq.assets") / "cifar10_test_lossless.npz"
    assert eval_set.is_file() and len(eval_set.read_bytes()) <= 5 * 2**20


def test_model_card_accuracy_on_shipped_subset(card):
    model = create_model()
    loader, _, _ = eval_loader(model, None, batch_size=128)
    res = evaluate(model, loader)
    assert res["num_images"] == 1017
    assert res["top1"] == pytest.approx(card["top1_lossless_1017"], abs=0.2)  # 2 images at most


def test_model_card_accuracy_on_full_test_set(card):
    npz = SHARED / "data" / "cifar10" / "cifar10_jpeg_official_order.npz"
    if not npz.is_file():
        pytest.skip("CIFAR-10 data not found")
    from PIL import Image

    from vmq.data import ArrayImageDataset, eval_transform

    z = np.load(npz, allow_pickle=False)
    blob, off = z["test_jpeg"], z["test_offsets"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(blob[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                       for i in range(len(off) - 1)])
    model = create_model()
    transform, _ = eval_transform(model)
    ds = ArrayImageDataset(images, z["test_y"], transform=transform)
    res = evaluate(model, torch.utils.data.DataLoader(ds, batch_size=250))
    assert res["num_images"] == 10000
    assert res["top1"] == pytest.approx(card["top1_test_10000"], abs=0.1)
