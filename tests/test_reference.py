"""The shipped reference models: weights in the package, accuracy as their model cards state."""

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
from vmq.models.registry import reference_models, shipped_weights

REFERENCES = ["vim_ref_cifar10", "vmamba_ref_cifar10"]


def _card(name):
    path = resources.files("vmq.assets") / f"{name}.json"
    assert path.is_file(), f"the metrics file of {name} is missing from vmq/assets"
    return json.loads(path.read_text())


def test_reference_models():
    assert REFERENCE_MODEL == "vim_ref_cifar10" and sorted(reference_models()) == sorted(REFERENCES)
    assert shipped_weights(REFERENCE_MODEL).name == REFERENCE_WEIGHTS


@pytest.mark.parametrize("name", REFERENCES)
def test_weights_are_shipped_and_small(name):
    path = shipped_weights(name)
    assert path.is_file() and path.name == f"{name}.safetensors"
    assert path.stat().st_size <= 10 * 2**20
    eval_set = resources.files("vmq.assets") / "cifar10_test_lossless.npz"
    assert eval_set.is_file() and len(eval_set.read_bytes()) <= 5 * 2**20


@pytest.mark.parametrize("name", REFERENCES)
def test_model_card_accuracy_on_shipped_subset(name):
    card = _card(name)
    model = create_model(name, pretrained=True)
    loader, _, _ = eval_loader(model, None, batch_size=128)
    res = evaluate(model, loader)
    assert res["num_images"] == 1017
    assert res["top1"] == pytest.approx(card["top1_lossless_1017"], abs=0.2)  # 2 images at most


@pytest.mark.parametrize("name", REFERENCES)
def test_model_card_accuracy_on_full_test_set(name):
    card = _card(name)
    npz = SHARED / "data" / "cifar10" / "cifar10_jpeg_official_order.npz"
    if not npz.is_file():
        pytest.skip("CIFAR-10 data not found")
    from PIL import Image

    from vmq.data import ArrayImageDataset, eval_transform

    z = np.load(npz, allow_pickle=False)
    blob, off = z["test_jpeg"], z["test_offsets"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(blob[off[i]:off[i + 1]].tobytes())).convert("RGB"))
                       for i in range(len(off) - 1)])
    model = create_model(name, pretrained=True)
    transform, _ = eval_transform(model)
    ds = ArrayImageDataset(images, z["test_y"], transform=transform)
    res = evaluate(model, torch.utils.data.DataLoader(ds, batch_size=250))
    assert res["num_images"] == 10000
    assert res["top1"] == pytest.approx(card["top1_test_10000"], abs=0.1)
