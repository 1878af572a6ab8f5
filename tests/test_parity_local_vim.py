"""Our LocalVim against outputs of the official LocalMamba code (../shared/fixtures, README-localmamba.md)."""

import json

import pytest
import torch
from safetensors.torch import load_file

import vmq.targets
from vmq.models import fitting_models
from vmq.ops.multi_scan import gather_steps
from vmq.models.local_vim import LOCAL_VIM, LocalVimConfig, LocalVisionMamba, TINY_DIRECTIONS
from vmq.models.registry import config_for, create
from vmq.ops.backend import use_backend

FIXTURES = ["localvim_micro", "localvim_micro_strong", "localvim_midcls_micro", "localvim_midcls_micro_strong"]
LOGITS_TOL = dict(atol=1e-5, rtol=1e-4)


def _feature_tol(name):
    return dict(atol=1e-3, rtol=1e-3) if name.endswith("_strong") else dict(atol=1e-4, rtol=1e-3)


def _config(d) -> LocalVimConfig:
    c = json.loads((d / "config.json").read_text())["effective_constructor_args"]
    mixer = json.loads((d / "config.json").read_text())["mixer_effective_args"]
    return LocalVimConfig(img_size=c["img_size"], patch_size=c["patch_size"], in_chans=c["channels"],
                          num_classes=c["num_classes"], embed_dim=c["embed_dim"], depth=c["depth"],
                          directions=c["directions"], d_state=mixer["d_state"], d_conv=mixer["d_conv"],
                          expand=mixer["expand"], norm_epsilon=c["norm_epsilon"],
                          residual_in_fp32=c["residual_in_fp32"], if_rope=c["if_rope"],
                          if_rope_residual=c["if_rope_residual"], pt_hw_seq_len=c["pt_hw_seq_len"],
                          if_cls_token=c["if_cls_token"], use_middle_cls_token=c["use_middle_cls_token"],
                          if_abs_pos_embed=c["if_abs_pos_embed"], final_pool_type=c["final_pool_type"])


def _load(fixtures_dir, name):
    d = fixtures_dir / name
    model = LocalVisionMamba(_config(d)).eval()
    model.load_state_dict(load_file(str(d / "state_dict.safetensors")), strict=True)
    return (model, load_file(str(d / "input.safetensors"))["input"], load_file(str(d / "logits.safetensors"))["logits"],
            load_file(str(d / "features.safetensors")))


def _features(model, x):
    """Every tensor the fixtures hold, computed by our model."""
    got = {}
    hidden, residual = model.embed(x), None
    got["embed_tokens"] = hidden
    for i, layer in enumerate(model.layers):
        if model.rope is not None and i < 2:
            got[f"block{i}.in_hidden_states"] = model.rope(hidden)
            if residual is not None:
                got[f"block{i}.in_residual"] = model.rope(residual)
        if i == 0:
            res_in = model.rope(hidden) if model.rope is not None else hidden
            mixer_in = layer.norm(res_in)
            got["block0.mixer_in"] = mixer_in
            m = layer.mixer
            xz = m.in_proj(mixer_in).transpose(1, 2)
            orders, _ = m.scan_orders(xz.shape[-1], xz.device)
            y = m.direction_outputs(mixer_in)
            merged = 0
            for k, order in enumerate(orders):
                got[f"block0.dir{k}.scan_in"] = gather_steps(xz, order)
                got[f"block0.dir{k}.ssm_out"] = gather_steps(y[:, k], order)  # zero at padding, like silu(z=0)
                got[f"block0.dir{k}.reversed"] = y[:, k].transpose(1, 2)
                got[f"block0.dir{k}.attn_out"] = m.attn(y[:, k].transpose(1, 2))
                merged = merged + got[f"block0.dir{k}.attn_out"]
            got["block0.merged"] = merged
        hidden, residual = layer(hidden, residual)
        got[f"block{i}.hidden_states"], got[f"block{i}.residual"] = hidden, residual
    got["forward_features"] = model.forward_features(x)
    return got


@pytest.mark.parametrize("backend", ["auto", "ref"])
@pytest.mark.parametrize("name", FIXTURES)
def test_logits_match_official(fixtures_dir, name, backend):
    model, x, ref, _ = _load(fixtures_dir, name)
    with torch.no_grad(), use_backend(backend):
        out = model(x)
    torch.testing.assert_close(out, ref, **LOGITS_TOL)


@pytest.mark.parametrize("name", ["localvim_micro_strong", "localvim_midcls_micro_strong"])
def test_training_scan_matches_official(fixtures_dir, name):
    model, x, ref, _ = _load(fixtures_dir, name)
    with torch.no_grad(), LOCAL_VIM.scan_implementation(model, "train"):
        out = model(x)
    assert all(layer.mixer.scan == "fused" for layer in model.layers)
    torch.testing.assert_close(out, ref, **LOGITS_TOL)


@pytest.mark.parametrize("name", FIXTURES)
def test_features_match_official(fixtures_dir, name):
    model, x, _, feats = _load(fixtures_dir, name)
    with torch.no_grad():
        got = _features(model, x)
    for key, ref in feats.items():
        assert key in got, f"fixture feature {key} not produced"
        torch.testing.assert_close(got[key], ref, **_feature_tol(name), msg=lambda m: f"{key}: {m}")
    assert len(feats) >= 28


def test_engine_block_loop_matches_fixture(fixtures_dir):
    """The family's embed / run_block (rope inside the block) give the fixture's block outputs."""
    model, x, _, feats = _load(fixtures_dir, "localvim_micro_strong")
    with torch.no_grad():
        io = LOCAL_VIM.embed(model, x)
        for i, (prefix, block) in enumerate(LOCAL_VIM.blocks(model)):
            assert prefix == f"layers.{i}."
            io = LOCAL_VIM.run_block(block, io)
            torch.testing.assert_close(io[0], feats[f"block{i}.hidden_states"], atol=1e-3, rtol=1e-3)
            torch.testing.assert_close(io[1], feats[f"block{i}.residual"], atol=1e-3, rtol=1e-3)


def test_a_logs_are_independent(fixtures_dir):
    """The official CPU build shares one storage among a layer's A_log_k; ours keeps four."""
    model, _, _, _ = _load(fixtures_dir, "localvim_midcls_micro_strong")
    m = model.layers[0].mixer
    ptrs = {getattr(m, f"A_log_{k}").data_ptr() for k in range(4)}
    assert len(ptrs) == 4
    assert not torch.equal(m.A_log_0, m.A_log_3)


def test_fixture_state_dict_order_and_fit(fixtures_dir):
    for name, registered in (("localvim_micro", "test_local_vim"), ("localvim_midcls_micro", "test_local_vim_midcls")):
        d = fixtures_dir / name
        keys = json.loads((d / "config.json").read_text())["state_dict"]["keys_and_shapes"]
        model = create(registered)
        assert [(k, list(v.shape)) for k, v in model.state_dict().items()] == [(k, v) for k, v in keys.items()]
        assert registered in fitting_models(load_file(str(d / "state_dict.safetensors")))


def test_registered_directions_match_official(fixtures_dir):
    for name, registered in (("localvim_micro", "local_vim_tiny"),
                             ("localvim_midcls_micro", "local_vim_tiny_middle_cls_token")):
        kw = json.loads((fixtures_dir / name / "config.json").read_text())["registered_model_kwargs"]
        cfg = config_for(registered)
        assert cfg.directions == TINY_DIRECTIONS == tuple(tuple(s) for s in kw["directions"])
        assert (cfg.patch_size, cfg.embed_dim, cfg.depth, cfg.if_rope, cfg.if_cls_token) == (
            kw["patch_size"], kw["embed_dim"], kw["depth"], kw["if_rope"], kw.get("if_cls_token", False))
    small = config_for("localvim_small")
    assert small.embed_dim == 384 and small.directions == (("h", "h_flip", "w2", "w2_flip"),) * 20


def test_full_size_tiny_on_meta_device():
    """LocalVim-T: 7,994,152 parameters and 748 state-dict keys with the official names and shapes."""
    with torch.device("meta"):
        model = LOCAL_VIM.build(config_for("local_vim_tiny"))
    sd = model.state_dict()
    assert sum(p.numel() for p in model.parameters()) == 7_994_152
    assert len(sd) == 748
    E, D, R = 384, 192, 12
    expect = {"pos_embed": (1, 196, D), "patch_embed.proj.weight": (D, 3, 16, 16), "rope.freqs_cos": (196, D),
              "rope.freqs_sin": (196, D), "head.weight": (1000, D), "norm_f.weight": (D,),
              "layers.19.norm.weight": (D,), "layers.0.mixer.in_proj.weight": (2 * E, D),
              "layers.0.mixer.out_proj.weight": (D, E), "layers.7.mixer.A_log_3": (E, 16), "layers.7.mixer.D_2": (E,),
              "layers.3.mixer.conv1d_1.weight": (E, 1, 4), "layers.3.mixer.conv1d_1.bias": (E,),
              "layers.3.mixer.x_proj_0.weight": (R + 32, E), "layers.3.mixer.dt_proj_2.weight": (E, R),
              "layers.3.mixer.dt_proj_2.bias": (E,), "layers.5.mixer.attn.norm.bias": (E,),
              "layers.5.mixer.attn.global_reduce.weight": (E // 8, E),
              "layers.5.mixer.attn.channel_select.weight": (E, E // 8)}
    for k, shape in expect.items():
        assert tuple(sd[k].shape) == shape, k
    assert fitting_models(sd) == ["local_vim_tiny"]
    with torch.device("meta"):
        midcls = LOCAL_VIM.build(config_for("local_vim_tiny_middle_cls_token"))
    assert len(midcls.state_dict()) == 747
    assert fitting_models(midcls.state_dict()) == ["local_vim_tiny_middle_cls_token"]


def test_config_round_trip_and_checks():
    cfg = config_for("local_vim_tiny")
    d = json.loads(json.dumps(LOCAL_VIM.config_to_dict(cfg)))
    assert LOCAL_VIM.config_from_dict(d) == cfg
    with pytest.raises(ValueError, match="unknown LocalVim config keys"):
        LocalVimConfig.from_dict({**d, "directionz": 1})
    with pytest.raises(ValueError, match="scan direction"):
        LocalVimConfig(depth=1, directions=(("h", "diag"),))
    with pytest.raises(ValueError, match="one non-empty set per layer"):
        LocalVimConfig(depth=2, directions=(("h",),))


def test_family_targets_and_folds():
    model = create("test_local_vim")
    names = [n for n, mod in model.named_modules() if isinstance(mod, torch.nn.Linear)]
    targets = [n for n in names if vmq.targets.matches(n, LOCAL_VIM.default_targets())]
    assert len(targets) == 4 * (2 + 2 * 4)
    assert not any("attn" in n for n in targets)
    folds = LOCAL_VIM.smoothing_folds(model.layers[0])
    assert [(f.layer, f.into, f.rows) for f in folds][:2] == [("mixer.in_proj", "norm", None),
                                                               ("mixer.dt_proj_0", "mixer.x_proj_0", (0, 3))]
    assert LOCAL_VIM.input_size(model) == (3, 56, 56) and model.pretrained_cfg["input_size"] == (3, 56, 56)
    assert LOCAL_VIM.bench_group("layers.2.mixer.x_proj_3") == "x_proj"
