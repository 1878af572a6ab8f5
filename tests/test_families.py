"""Every model family through the toolchain: W8A8 PTQ4VM and 2-bit ViM-VQ end to end on its tiny
variant (compress, pack, reload, evaluate), and what the family protocol promises the engine."""

import pytest
import timm
import torch

import vmq
import vmq.targets
from vmq.metrics import snr_db
from vmq.models import FAMILIES, family_for
from vmq.models.family import io_len
from vmq.pack.format import load_packed

# one tiny variant per family (random weights, the parity fixtures' shapes); 2-bit VQ as d=1, K=4, which
# fits the tiniest layers (VMamba's micro x_proj is 3x8)
TINY = ["test_vim", "test_vmamba", "test_vmamba_v0", "test_local_vim", "test_local_vim_midcls", "test_local_vmamba"]
PTQ = {"quantization": {"method": "ptq4vm", "scheme": "W8A8", "jlss": {"iterations": 4, "batch_size": 4},
                        "truncation": {"num_images": 8, "grid": 10}}}
VQ = {"vq": {"method": "vimvq", "codebook": {"dim": 1, "size": 4}, "kmeans": {"iterations": 5},
             "search": {"iterations": 4, "batch_size": 4}, "confirm": {"schedule": [0.5, 1.0]}}}


def _tiny(name: str):
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    c, h, w = model.pretrained_cfg["input_size"]
    return name, model, torch.randn(8, c, h, w, generator=torch.Generator().manual_seed(1))


def test_every_family_has_a_tiny_variant():
    assert sorted({family_for(name).name for name in TINY}) == sorted(FAMILIES)


@pytest.mark.parametrize("name", TINY)
def test_family_protocol(name):
    name, model, images = _tiny(name)
    fam = family_for(name)
    assert type(model) is fam.model_class
    with torch.no_grad():
        io = fam.embed(model, images)
        for _, block in fam.blocks(model):
            io = fam.run_block(block, io)
        assert io_len(io) == len(images)
        ref = model(images)
        assert torch.equal(fam.head(model, io), ref)  # the blocks, then the head: the model's logits
        # the training scan gives the fused scan's logits
        with fam.scan_implementation(model, "train"):
            torch.testing.assert_close(model(images), ref, atol=1e-4, rtol=1e-4)
    targets = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)
               and vmq.targets.matches(n, fam.default_targets())]
    assert targets, "the default targets match no layer"
    # every fold names a target and a module of the block
    for prefix, block in fam.blocks(model):
        mods = dict(block.named_modules())
        for fold in fam.smoothing_folds(block):
            assert fold.layer in mods and fold.into in mods, (prefix, fold)


@pytest.mark.parametrize("name", TINY)
@pytest.mark.parametrize("recipe", [PTQ, VQ], ids=["w8a8-ptq4vm", "vq2-vimvq"])
def test_compress_pack_reload_eval(name, recipe, tmp_path):
    name, model, images = _tiny(name)
    with torch.no_grad():
        fp = model(images)
    result = vmq.compress(recipe, model=model, images=images, evaluate_model=False)
    with torch.no_grad():
        q = result.model(images)
    assert snr_db(fp, q) > (20.0 if "quantization" in recipe else 5.0)
    path = tmp_path / f"{name}.safetensors"
    result.save(path)
    loaded, meta = load_packed(path)
    assert meta["model"]["family"] == family_for(name).name and meta["model"]["name"] == name
    with torch.no_grad():
        torch.testing.assert_close(loaded(images), q, atol=1e-4, rtol=1e-4)
