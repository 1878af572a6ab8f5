"""The library entry point ``vmq.compress``: inputs it takes, what it leaves alone, its errors."""

import pytest
import timm
import torch

import vmq
from vmq.errors import VmqError
from vmq.layers import QuantizedLinear, VQLinear
from vmq.models.vim import VimConfig, VisionMamba
from vmq.quant.recipe import QuantRecipe
from vmq.recipe import parse_recipe


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return timm.create_model("test_vim").eval(), torch.randn(8, 3, 32, 32)


def test_dict_recipe_given_model_and_images(tiny):
    model, images = tiny
    grad_mode = torch.is_grad_enabled()
    result = vmq.compress({"quantization": {"method": "rtn", "scheme": "W8A8"}}, model=model, images=images,
                          evaluate_model=False)
    assert torch.is_grad_enabled() == grad_mode  # grad mode is handled inside
    assert result.model is model and len(result.reports) == 12
    assert all(isinstance(m, QuantizedLinear) for n, m in model.named_modules() if n.endswith("in_proj"))
    res = result.results()
    assert res["model"] == "test_vim" and res["scheme"] == "W8A8" and res["quant_top1"] is None
    assert result.recipe.quantization.targets  # the family's default targets, resolved
    assert result.recipe.device == "cpu"


def test_vq_recipe_and_the_callers_recipe_is_not_changed(tiny):
    model, images = tiny
    recipe = parse_recipe({}, QuantRecipe, ["quantization.method=rtn", "quantization.scheme=W4A16"])
    before = recipe.model_dump()
    vmq.compress(recipe, model=model, images=images, evaluate_model=False)
    assert recipe.model_dump() == before
    model2 = timm.create_model("test_vim").eval()
    result = vmq.compress({"vq": {"method": "kmeans", "codebook": {"dim": 2, "size": 16}}}, model=model2,
                          images=images, evaluate_model=False)
    assert result.method.name == "kmeans" and any(isinstance(m, VQLinear) for m in model2.modules())


def test_errors(tiny):
    model, images = tiny
    with pytest.raises(VmqError, match="no registered name"):
        vmq.compress({"quantization": {"method": "rtn"}}, model=VisionMamba(VimConfig(img_size=32, patch_size=8,
                     stride=8, embed_dim=16, depth=1, num_classes=10)), images=images, evaluate_model=False)
    with pytest.raises(VmqError, match="--device must be cpu, cuda or cuda:N"):
        vmq.compress({"quantization": {"method": "rtn"}}, model=model, images=images, device="tpu")
    with pytest.raises(VmqError, match="unknown method 'gptq'"):
        vmq.compress({"quantization": {"method": "gptq"}}, model=model, images=images)
    if not torch.cuda.is_available():
        with pytest.raises(VmqError, match="no CUDA device"):
            vmq.compress({"quantization": {"method": "rtn"}}, model=model, images=images, device="cuda")
