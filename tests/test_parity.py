"""Our Vim against outputs of the official Vim code (../shared/fixtures)."""

from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import fixture_config
from vmq.models.vim import VisionMamba
from vmq.ops.scan import selective_scan_ref

FIXTURE_NAMES = ["vim_micro", "vim_micro_strong", "vim_small_stride8_variant"]


def _load(fixtures_dir, name):
    d = fixtures_dir / name
    model = VisionMamba(fixture_config(d)).eval()
    model.load_state_dict(load_file(str(d / "state_dict.safetensors")), strict=True)
    return (model, load_file(str(d / "input.safetensors"))["input"], load_file(str(d / "logits.safetensors"))["logits"],
            load_file(str(d / "features.safetensors")))


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_logits_match_official(fixtures_dir, name):
    model, x, ref, _ = _load(fixtures_dir, name)
    with torch.no_grad():
        out = model(x)
    err = (out - ref).abs().max().item()
    assert err <= 1e-4 * ref.abs().max().item(), err
    atol = 5e-5 if name == "vim_micro_strong" else 1e-5
    torch.testing.assert_close(out, ref, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_features_match_official(fixtures_dir, name):
    model, x, _, feats = _load(fixtures_dir, name)
    got = {}
    with torch.no_grad():
        hidden, residual = model.embed(x), None
        got["embed_tokens"] = hidden
        for i, layer in enumerate(model.layers):
            if i == 0:
                mixer_in = layer.norm(hidden)
                got["block0.mixer_in"] = mixer_in
                m = layer.mixer
                x_, z_ = m.in_proj(mixer_in).transpose(1, 2).chunk(2, dim=1)
                (conv, xp, dtp, A_log, D), (conv_b, xp_b, dtp_b, A_b_log, D_b) = m.directions()
                u, delta, B, C = m.branch(x_, conv, xp, dtp)
                got["block0.out_fwd"] = selective_scan_ref(u, delta, -A_log.exp(), B, C, D, z_, delta_softplus=True)
                u, delta, B, C = (t.flip(-1) for t in m.branch(x_, conv_b, xp_b, dtp_b, reverse=True))
                got["block0.out_bwd_flipped"] = selective_scan_ref(u, delta, -A_b_log.exp(), B, C, D_b, z_.flip(-1),
                                                                   delta_softplus=True)
            hidden, residual = layer(hidden, residual)
            got[f"block{i}.hidden_states"], got[f"block{i}.residual"] = hidden, residual
        got["forward_features"] = model.forward_features(x)
    compared = 0
    for key, ref in feats.items():
        assert key in got, f"fixture feature {key} not produced"
        torch.testing.assert_close(got[key], ref, atol=1e-4, rtol=1e-4, msg=lambda m: f"{key}: {m}")
        compared += 1
    assert compared >= 8


def test_fixture_semantics_cls_in_middle(fixtures_dir):
    """The cls token sits at M//2 and the head reads it (mean pooling is unused)."""
    model, x, ref, _ = _load(fixtures_dir, "vim_micro_strong")
    assert model.cfg.cls_position == model.cfg.num_patches // 2 == 8
    twin = VisionMamba(replace(model.cfg, use_middle_cls_token=False)).eval()
    twin.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert not torch.allclose(twin(x), ref, atol=1e-3)


def test_backward_direction_matters(fixtures_dir):
    """Dropping the backward scan (what the official slow path does) must break parity."""
    model, x, ref, _ = _load(fixtures_dir, "vim_micro_strong")
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.D_b.zero_()
            layer.mixer.x_proj_b.weight.zero_()
        assert (model(x) - ref).abs().max() > 1e-3
