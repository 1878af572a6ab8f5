"""Our LocalVMamba against outputs of the official LocalMamba code (../shared/fixtures/localvmamba_micro*),
and the official key layout of the full-size models."""

import json
import re

import pytest
import timm
import torch
from safetensors.torch import load_file

import vmq.models  # noqa: F401  (registers the models)
from tests.test_parity_vmamba import to_official as vmamba_to_official
from vmq.models import fitting_models
from vmq.models.local_vmamba import LOCAL_VMAMBA, LOCAL_VSSM_TINY_DIRECTIONS, LocalVMamba, LocalVMambaConfig
from vmq.models.registry import MODELS

FIXTURES = ["localvmamba_micro", "localvmamba_micro_strong"]
FEATURE_ATOL = {"localvmamba_micro": 1e-4, "localvmamba_micro_strong": 1e-3}  # the fixtures' README, rtol 1e-3


def official_config(d) -> LocalVMambaConfig:
    kw = json.loads((d / "config.json").read_text())["effective_constructor_args"]
    assert kw["ssm_dt_rank"] == "auto" and kw["patch_norm"] and kw["norm_layer"] == "LN" and not kw["ssm_simple_init"]
    return LocalVMambaConfig(img_size=64, patch_size=kw["patch_size"], in_chans=kw["in_chans"],
                             num_classes=kw["num_classes"], dims=kw["dims"], depths=kw["depths"],
                             directions=kw["directions"], ssm_d_state=kw["ssm_d_state"], ssm_ratio=kw["ssm_ratio"],
                             ssm_conv=kw["ssm_conv"], ssm_conv_bias=kw["ssm_conv_bias"],
                             drop_path_rate=kw["drop_path_rate"])


def load_official(d):
    model = LocalVMamba(official_config(d)).eval()
    sd = load_file(str(d / "state_dict.safetensors"))
    model.load_state_dict(LOCAL_VMAMBA.checkpoint_filter(sd, model), strict=True)
    return model


def our_features(model: LocalVMamba, x: torch.Tensor) -> dict:
    got = {}
    with torch.no_grad():
        h = model.patch_embed(x)
        got["embed"] = h
        block = model.layers[0].blocks[0]
        op = block.op
        b, H, W, _ = h.shape
        s_in = block.norm(h)
        got["s0b0.norm_out"] = s_in
        xs = op.in_proj(s_in.reshape(b, H * W, -1)).chunk(2, dim=-1)[0]
        got["s0b0.conv_out"] = op.conv2d(xs.transpose(1, 2).reshape(b, -1, H, W))
        u, _ = op.conv_branch(s_in)
        order = op.orders(H, W, u.device)  # (K, Lmax), -1 at window and stack padding

        def in_scan_order(t, k):  # (b, D, L) token order -> (b, D, Lmax) scan order, zeros at padding
            return torch.where(order[k] >= 0, torch.nn.functional.pad(t, (0, 1))[..., order[k]], 0.0)

        ys = op.selective_scan(u, H, W, "none")
        got["s0b0.scan_in"] = torch.stack([in_scan_order(u, k) for k in range(len(order))], dim=1)
        got["s0b0.ssm_out"] = torch.stack([in_scan_order(ys[:, k], k) for k in range(len(order))], dim=1)
        for k in range(len(order)):
            got[f"s0b0.dir{k}.reversed"] = ys[:, k].transpose(1, 2)
            got[f"s0b0.dir{k}.attn_out"] = op.attn(ys[:, k].transpose(1, 2))
        got["s0b0.merged"] = merged = op.mix(u, H, W)
        got["s0b0.out_norm"] = op.out_norm(merged)
        got["s0b0.op_out"] = op(s_in)
        for s, stage in enumerate(model.layers):
            for j, blk in enumerate(stage.blocks):
                h = blk(h)
                got[f"stage{s}.block{j}.out"] = h
            if stage.downsample is not None:
                h = stage.downsample(h)
                got[f"stage{s}.downsample"] = h
        got["pre_logits"] = model.classifier.pool(h)
    return got


@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_official(fixtures_dir, name):
    d = fixtures_dir / name
    model = load_official(d)
    with torch.no_grad():
        out = model(load_file(str(d / "input.safetensors"))["input"])
    torch.testing.assert_close(out, load_file(str(d / "logits.safetensors"))["logits"], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", FIXTURES)
def test_features_match_official(fixtures_dir, name):
    d = fixtures_dir / name
    model = load_official(d)
    got = our_features(model, load_file(str(d / "input.safetensors"))["input"])
    feats = load_file(str(d / "features.safetensors"))
    for key, ref in feats.items():
        assert key in got, f"fixture feature {key} not produced"
        torch.testing.assert_close(got[key], ref, atol=FEATURE_ATOL[name], rtol=1e-3, msg=lambda m: f"{key}: {m}")
    assert len(feats) >= 23


def test_window_padding_and_directions_matter(fixtures_dir):
    """Scanning every block h / h_flip only (no windows, no padding) must break parity."""
    d = fixtures_dir / "localvmamba_micro_strong"
    model = load_official(d)
    for m in model.modules():
        if hasattr(m, "directions"):
            m.directions = ("h", "h_flip") * (len(m.directions) // 2)
    with torch.no_grad():
        out = model(load_file(str(d / "input.safetensors"))["input"])
    assert (out - load_file(str(d / "logits.safetensors"))["logits"]).abs().max() > 1e-2


def test_training_scan_matches(fixtures_dir):
    d = fixtures_dir / "localvmamba_micro_strong"
    model = load_official(d)
    with torch.no_grad(), LOCAL_VMAMBA.scan_implementation(model, "train"):
        out = model(load_file(str(d / "input.safetensors"))["input"])
    torch.testing.assert_close(out, load_file(str(d / "logits.safetensors"))["logits"], atol=1e-5, rtol=1e-4)


def test_non_square_input_runs():
    model = timm.create_model("test_local_vmamba").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 48)).shape == (1, 10)


# -- official key layout -----------------------------------------------------------------------------
def to_official(sd: dict) -> dict:
    return {re.sub(r"\.op\.attn\.", ".op.multi_scan.attn.", k): v for k, v in vmamba_to_official(sd).items()}


@pytest.mark.parametrize("alias,params,keys", [("local_vmamba_tiny", 25_527_160, 302),
                                               ("local_vmamba_small", None, 302 + 18 * 19)])
def test_full_size_official_layout(alias, params, keys):
    with torch.device("meta"):
        model = timm.create_model(alias)
    n = sum(p.numel() for p in model.parameters())
    assert n == params if params else n / 1e6 == pytest.approx(50, abs=0.5)
    ours = model.state_dict()
    official = to_official(ours)
    assert len(official) == keys
    assert official["layers.2.blocks.8.op.multi_scan.attn.global_reduce.weight"].shape == (96, 768)
    assert official["layers.0.blocks.0.op.x_proj_weight"].shape == (4, 6 + 32, 192)
    assert official["layers.0.downsample.reduction.weight"].shape == (192, 384)
    back = LOCAL_VMAMBA.checkpoint_filter(official, model)
    assert set(back) == set(ours) and all(back[k].shape == ours[k].shape for k in ours)
    assert fitting_models(official) == [model.vmq_name]


def test_fixture_fits_its_test_model(fixtures_dir):
    path = fixtures_dir / "localvmamba_micro" / "state_dict.safetensors"
    assert fitting_models(load_file(str(path))) == ["test_local_vmamba"]
    assert vmq.models.create_model(None, path).vmq_name == "test_local_vmamba"
    assert MODELS["test_local_vmamba"].config == official_config(fixtures_dir / "localvmamba_micro")
    micro = official_config(fixtures_dir / "localvmamba_micro")
    assert MODELS["local_vssm_tiny"].config.directions[:5] == micro.directions
    assert len(LOCAL_VSSM_TINY_DIRECTIONS) == 15
