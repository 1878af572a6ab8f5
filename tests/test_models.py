"""Registry, configs and checkpoint loading."""

import zipfile

import pytest
import timm
import torch
from safetensors.torch import save_file

import vmq.models  # noqa: F401  (registers the models)
from vmq.errors import VmqError
from vmq.models import create_model, family_for, family_of, fitting_models, load_checkpoint, read_state_dict
from vmq.models.registry import ALIASES, MODELS

OFFICIAL_PARAMS_M = {"vim_tiny": 7, "vim_small": 26, "vim_base": 98}  # the Vim paper's Table 1


@pytest.mark.parametrize("alias,millions", OFFICIAL_PARAMS_M.items())
def test_official_sizes(alias, millions):
    with torch.device("meta"):
        model = timm.create_model(alias)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.5)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.pretrained_cfg["crop_pct"] == 0.875
    assert model.pretrained_cfg["interpolation"] == "bicubic"


def test_every_name_is_registered_and_builds():
    for name in list(MODELS) + list(ALIASES):
        assert name in timm.list_models(name)
        with torch.device("meta"):
            timm.create_model(name, num_classes=7)


def test_stride8_twins_have_more_tokens():
    tiny = MODELS[ALIASES["vim_tiny"]].config
    s8 = MODELS[ALIASES["vim_tiny_stride8"]].config
    assert tiny.num_tokens == 197 and s8.num_tokens == 27 * 27 + 1


def test_create_model_and_num_classes():
    m = timm.create_model("test_vim", num_classes=3)
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(VmqError, match="unexpected keyword argument 'no_such_flag'"):
        timm.create_model("test_vim", no_such_flag=1)


def test_unknown_model_names_closest():
    with pytest.raises(VmqError, match="did you mean vim_tiny"):
        create_model("vim_tinyy")


def test_pretrained_only_for_reference():
    with pytest.raises(VmqError, match="cannot download"):
        timm.create_model("vim_tiny", pretrained=True)


def test_checkpoint_formats(tmp_path, fixtures_dir):
    sd = read_state_dict(fixtures_dir / "vim_micro" / "state_dict.safetensors")
    x = torch.randn(2, 3, 32, 32)
    ref = create_model("test_vim", fixtures_dir / "vim_micro" / "state_dict.safetensors")
    with torch.no_grad():
        expected = ref(x)
    official = tmp_path / "official.pth"
    import argparse

    args = argparse.Namespace(model="vim_tiny", lr=5e-4)  # as the official training script saves
    torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3, "args": args}, official)
    plain = tmp_path / "plain.pt"
    torch.save(sd, plain)
    for path in (official, plain):
        m = create_model("test_vim", path)
        with torch.no_grad():
            torch.testing.assert_close(m(x), expected)
    # without a name, the fitting registered model is found from the keys
    assert create_model(None, official).vmq_name == "test_vim"


def test_key_mismatch_names_fitting_model(fixtures_dir):
    path = fixtures_dir / "vim_micro" / "state_dict.safetensors"
    model = timm.create_model("test_vim_stride")
    with pytest.raises(VmqError) as e:
        load_checkpoint(model, path, family_for("test_vim_stride"), model_name="test_vim_stride")
    msg = str(e.value)
    assert "does not fit test_vim_stride" in msg and "it fits test_vim" in msg and "\n" not in msg


def test_foreign_architecture(tmp_path):
    path = tmp_path / "resnet.safetensors"
    save_file({"conv1.weight": torch.zeros(8, 3, 3, 3), "fc.weight": torch.zeros(10, 8)}, str(path))
    model = timm.create_model("test_vim")
    with pytest.raises(VmqError, match="no registered model fits"):
        load_checkpoint(model, path, family_of(model))
    assert fitting_models(read_state_dict(path)) == []


@pytest.mark.parametrize("fmt", ["safetensors", "official.pth", "plain.pth"])
def test_timm_pretrained_from_a_local_file(tmp_path, fixtures_dir, fmt):
    """timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=PATH)) loads a local file."""
    src = fixtures_dir / "vim_micro" / "state_dict.safetensors"
    sd = read_state_dict(src)
    if fmt == "safetensors":
        path = src
    else:
        path = tmp_path / fmt
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}} if fmt == "official.pth" else sd, path)
    model = timm.create_model("test_vim", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert model.vmq_name == "test_vim" and model.pretrained_cfg["file"] == str(path)
    got = model.state_dict()
    assert set(got) == set(sd)
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), create_model("test_vim", src)(x))


def test_timm_pretrained_from_a_wrong_file(tmp_path, fixtures_dir):
    micro = fixtures_dir / "vim_micro" / "state_dict.safetensors"
    with pytest.raises(VmqError) as e:
        timm.create_model("test_vim_stride", pretrained=True, pretrained_cfg_overlay=dict(file=str(micro)))
    msg = str(e.value)
    assert "does not fit test_vim_stride" in msg and "it fits test_vim" in msg and "\n" not in msg
    with pytest.raises(VmqError, match="checkpoint not found"):
        timm.create_model("test_vim", pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "nope.pth")))
    evil = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil()}, evil)
    with pytest.raises(VmqError, match="never unpickles code"):
        timm.create_model("test_vim", pretrained=True, pretrained_cfg_overlay=dict(file=str(evil)))


def test_bad_files(tmp_path, fixtures_dir):
    with pytest.raises(VmqError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(VmqError, match="empty"):
        read_state_dict(empty)
    good = tmp_path / "good.pth"
    torch.save({"model": read_state_dict(fixtures_dir / "vim_micro" / "state_dict.safetensors")}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(VmqError, match="truncated or corrupt"):
        read_state_dict(truncated)
    st = tmp_path / "bad.safetensors"
    st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(VmqError, match="not a valid safetensors"):
        read_state_dict(st)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_pickled_code_is_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.zeros(1)}, "payload": _Evil()}, path)
    assert zipfile.is_zipfile(path)
    with pytest.raises(VmqError, match="Python objects besides weights .*never unpickles code"):
        read_state_dict(path)
