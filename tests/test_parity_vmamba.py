"""Our VMamba against outputs of the official VMamba code (../shared/fixtures/vmamba_micro*), and
the official key layout of the full-size models."""

import json
import re

import pytest
import timm
import torch
from safetensors.torch import load_file

import vmq.models  # noqa: F401  (registers the models)
from vmq.models import family_for, fitting_models
from vmq.models.registry import MODELS
from vmq.models.vmamba import VMAMBA, VMamba, VMambaConfig

FIXTURES = ["vmamba_micro", "vmamba_micro_strong", "vmamba_micro_s2", "vmamba_micro_v0"]
SUMS_OF_FOUR = ("block0.ss2d.merged", "block0.scan.y")  # reach tens: compared at rtol 1e-5 of max|x|


def official_config(d) -> VMambaConfig:
    """The VMambaConfig of a fixture, from the official constructor arguments it records."""
    kw = json.loads((d / "config.json").read_text())["vssm_constructor_kwargs"]
    assert kw["ssm_dt_rank"] == "auto" and kw["patch_norm"] and not kw["posembed"] and not kw["gmlp"]
    return VMambaConfig(img_size=kw["imgsize"], patch_size=kw["patch_size"], in_chans=kw["in_chans"],
                        num_classes=kw["num_classes"], dims=kw["dims"], depths=kw["depths"],
                        ssm_d_state=kw["ssm_d_state"], ssm_ratio=kw["ssm_ratio"], ssm_conv=kw["ssm_conv"],
                        ssm_conv_bias=kw["ssm_conv_bias"], forward_type=kw["forward_type"], mlp_ratio=kw["mlp_ratio"],
                        norm_layer=kw["norm_layer"], patchembed_version=kw["patchembed_version"],
                        downsample_version=kw["downsample_version"], drop_path_rate=kw["drop_path_rate"])


def load_official(d):
    model = VMamba(official_config(d)).eval()
    sd = load_file(str(d / "state_dict.safetensors"))
    model.load_state_dict(VMAMBA.checkpoint_filter(sd, model), strict=True)
    return model


def _inputs(d, rect):
    suffix = "_rect" if rect else ""
    return (load_file(str(d / f"input{suffix}.safetensors"))["input"],
            load_file(str(d / f"logits{suffix}.safetensors"))["logits"],
            load_file(str(d / f"features{suffix}.safetensors")))


def our_features(model: VMamba, x: torch.Tensor, channel_first: bool) -> dict:
    """Our intermediate tensors, named and laid out as the fixture's features."""
    grid = (lambda t: t.permute(0, 3, 1, 2)) if channel_first else (lambda t: t)  # (B,H,W,C) -> fixture layout
    got = {}
    with torch.no_grad():
        h = model.patch_embed(x)
        got["patch_embed"] = grid(h)
        block = model.layers[0].blocks[0]
        op = block.op
        b, H, W, _ = h.shape
        s_in = block.norm(h)
        got["block0.ss2d_in"] = grid(s_in)
        u, z = op.conv_branch(s_in)
        got["block0.ss2d.conv_act"] = u.view(b, -1, H, W)
        if z is not None:
            got["block0.ss2d.z_act"] = torch.nn.functional.silu(z).view(b, H, W, -1)
        order = op.orders(H, W, u.device)
        deltas, Bs, Cs = op.scan_inputs(u)
        in_scan_order = lambda ts: torch.stack([t[..., order[k]] for k, t in enumerate(ts)], dim=1)  # noqa: E731
        got["block0.scan.u"] = in_scan_order([u] * 4)
        got["block0.scan.delta_raw"] = in_scan_order(deltas)
        got["block0.scan.B"], got["block0.scan.C"] = in_scan_order(Bs), in_scan_order(Cs)
        got["block0.scan.y"] = in_scan_order(op.selective_scan(u, H, W, "none").unbind(1))
        merged = op.mix(u, H, W)  # (B, L, D)
        got["block0.ss2d.merged"] = merged.transpose(1, 2).reshape(b, -1, H, W) if channel_first else merged
        normed = op.out_norm(merged)
        got["block0.ss2d.out_norm"] = normed.transpose(1, 2).reshape(b, -1, H, W) if channel_first else normed
        got["block0.ss2d_out"] = grid(op(s_in))
        got["block0.out"] = grid(block(h))
        for i, stage in enumerate(model.layers):
            h = stage.blocks(h)
            got[f"stage{i}.blocks_out"] = grid(h)
            if stage.downsample is not None:
                h = stage.downsample(h)
                got[f"stage{i}.out"] = grid(h)
        got["pre_logits"] = model.classifier.pool(h)
    return got


@pytest.mark.parametrize("rect", [False, True], ids=["square", "rect"])
@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_official(fixtures_dir, name, rect):
    model = load_official(fixtures_dir / name)
    x, ref, _ = _inputs(fixtures_dir / name, rect)
    with torch.no_grad():
        out = model(x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("rect", [False, True], ids=["square", "rect"])
@pytest.mark.parametrize("name", FIXTURES)
def test_features_match_official(fixtures_dir, name, rect):
    d = fixtures_dir / name
    model = load_official(d)
    x, _, feats = _inputs(d, rect)
    got = our_features(model, x, channel_first=model.cfg.norm_layer == "ln2d")
    for key, ref in feats.items():
        assert key in got, f"fixture feature {key} not produced"
        atol = max(5e-5, 1e-5 * ref.abs().max().item()) if key in SUMS_OF_FOUR else 5e-5
        torch.testing.assert_close(got[key], ref, atol=atol, rtol=0, msg=lambda m: f"{key}: {m}")
    assert len(feats) >= (7 if rect else 20)


def test_scan_order_matters(fixtures_dir):
    """Cross-merging with the column-major directions read row-major must break parity."""
    d = fixtures_dir / "vmamba_micro_strong"
    model = load_official(d)
    x, ref, _ = _inputs(d, rect=True)
    for op in (m for m in model.modules() if hasattr(m, "orders")):
        op.orders = lambda H, W, device: torch.arange(H * W, device=device).repeat(4, 1)
    with torch.no_grad():
        assert (model(x) - ref).abs().max() > 1e-3


def test_training_scan_matches(fixtures_dir):
    d = fixtures_dir / "vmamba_micro_strong"
    model = load_official(d)
    x, ref, _ = _inputs(d, rect=True)
    with torch.no_grad(), VMAMBA.scan_implementation(model, "train"):
        torch.testing.assert_close(model(x), ref, atol=1e-5, rtol=1e-4)
    assert all(m.scan == "fused" for m in model.modules() if hasattr(m, "scan"))


# -- official key layout -----------------------------------------------------------------------------
def to_official(sd: dict) -> dict:
    """vmq's state dict in the official key names and layouts (the inverse of the checkpoint filter)."""
    out, stacked = {}, {}
    for key, v in sd.items():
        if m := re.fullmatch(r"(.*\.op\.)(x_proj|dt_projs)\.(\d+)\.weight", key):
            stacked.setdefault(f"{m[1]}{m[2]}_weight", {})[int(m[3])] = v
        elif m := re.fullmatch(r"(layers\.\d+\.downsample\.)proj\.(weight|bias)", key):
            out[f"{m[1]}1.{m[2]}"] = v.reshape(v.shape[0], -1, 3, 3) if m[2] == "weight" else v
        elif (m := re.fullmatch(r"(layers\.\d+\.downsample\.)norm\.(weight|bias)", key)) \
                and f"{m[1]}proj.weight" in sd:
            out[f"{m[1]}3.{m[2]}"] = v
        else:
            out[key] = v
    for key, parts in stacked.items():
        out[key] = torch.stack([parts[k] for k in range(len(parts))])
    return out


def _meta_model(name):
    with torch.device("meta"):
        return timm.create_model(name)


OFFICIAL_SIZES = {  # name: (millions of parameters in the VMamba paper / README, official state-dict keys)
    "vmamba_tiny": (30, 276), "vmamba_small": (50, 402), "vmamba_base": (89, 402), "vanilla_vmamba_tiny": (22.9, 212)}


@pytest.mark.parametrize("alias", sorted(OFFICIAL_SIZES))
def test_full_size_official_layout(alias):
    millions, keys = OFFICIAL_SIZES[alias]
    model = _meta_model(alias)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.5)
    ours = model.state_dict()
    official = to_official(ours)
    assert len(official) == keys
    back = VMAMBA.checkpoint_filter(official, model)
    assert set(back) == set(ours) and all(back[k].shape == ours[k].shape for k in ours)
    assert model.pretrained_cfg["input_size"] == (3, 224, 224)
    assert model.pretrained_cfg["classifier"] == "classifier.head"
    assert fitting_models(official) == [model.vmq_name]


def test_official_key_names_on_full_size():
    """Spot checks of official names and shapes (VMamba-T [s1l8]: dims 96..768, ssm_ratio 1, d_state 1)."""
    official = to_official(_meta_model("vmamba_tiny").state_dict())
    assert official["layers.0.blocks.0.op.x_proj_weight"].shape == (4, 6 + 2, 96)
    assert official["layers.0.blocks.0.op.dt_projs_weight"].shape == (4, 96, 6)
    assert official["layers.2.blocks.7.op.A_logs"].shape == (4 * 384, 1)
    assert official["layers.1.downsample.1.weight"].shape == (384, 192, 3, 3)
    assert official["layers.1.downsample.3.weight"].shape == (384,)
    assert official["patch_embed.5.weight"].shape == (96, 48, 3, 3)
    assert "layers.3.downsample.1.weight" not in official and official["classifier.head.weight"].shape == (1000, 768)


def test_legacy_names_and_linear2d_shapes(fixtures_dir):
    """The renames of the official _load_from_state_dict, and (out, in, 1, 1) Linear2d weights."""
    sd = load_file(str(fixtures_dir / "vmamba_micro_v0" / "state_dict.safetensors"))
    legacy = {}
    for k, v in sd.items():
        k = re.sub(r"^patch_embed\.0\.", "patch_embed.proj.", k)
        k = re.sub(r"^classifier\.(norm|head)\.", r"\1.", k)
        k = re.sub(r"\.blocks\.(\d+)\.norm\.", r".blocks.\1.ln_1.", k)
        k = re.sub(r"\.blocks\.(\d+)\.op\.", r".blocks.\1.self_attention.", k)
        legacy[k] = v[..., None, None] if k.endswith(("in_proj.weight", "out_proj.weight")) else v
    model = VMamba(official_config(fixtures_dir / "vmamba_micro_v0"))
    model.load_state_dict(VMAMBA.checkpoint_filter(legacy, model), strict=True)
    assert fitting_models(legacy) == ["test_vmamba_v0"]


@pytest.mark.parametrize("name,model_name", [("vmamba_micro", "test_vmamba"), ("vmamba_micro_s2", "test_vmamba_s2"),
                                             ("vmamba_micro_v0", "test_vmamba_v0")])
def test_fixture_fits_its_test_model(fixtures_dir, name, model_name):
    path = fixtures_dir / name / "state_dict.safetensors"
    assert fitting_models(load_file(str(path))) == [model_name]
    model = vmq.models.create_model(None, path)
    assert model.vmq_name == model_name and family_for(model_name) is VMAMBA
    assert MODELS[model_name].config == official_config(fixtures_dir / name)
