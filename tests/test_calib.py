"""Block-by-block calibration capture."""

import timm
import torch

import vmq.models  # noqa: F401
from vmq.calib import LinearObserver
from vmq.models import family_of


def test_block_by_block_reproduces_forward():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    x = torch.randn(5, 3, 32, 32)
    fam = family_of(model)
    blocks = fam.blocks(model)
    assert [p for p, _ in blocks] == ["layers.0.", "layers.1."] and [b for _, b in blocks] == list(model.layers)
    io = fam.embed_batched(model, x, 2)
    for _, block in blocks:
        io = fam.run_batched(block, io, 3)
    hidden, residual = io
    assert fam.block_output(io) is hidden
    with torch.no_grad():
        feats = model.norm_f(residual + hidden)[:, model.cfg.cls_position]
        torch.testing.assert_close(model.head(feats), model(x))


def test_observer_sees_every_projection_of_both_directions():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    x = torch.randn(4, 3, 32, 32)
    fam = family_of(model)
    block = model.layers[0]
    names = ["mixer.in_proj", "mixer.x_proj", "mixer.x_proj_b", "mixer.dt_proj", "mixer.dt_proj_b", "mixer.out_proj"]
    with LinearObserver(block, names, keep_samples=3) as obs:
        fam.run_batched(block, fam.embed_batched(model, x, 32), 2)
    assert set(obs.stats) == set(names)
    st = obs.stats["mixer.in_proj"]
    tokens = model.cfg.num_tokens
    assert st.count == 4 * tokens and st.min.shape == (tokens, 48) and st.channel_absmax.shape == (48,)
    assert st.sample_tensor().shape == (3, tokens, 48)
    lo, hi = st.ranges()
    assert lo.shape == (tokens,) and (hi >= lo).all()
    # hooks are gone after the context
    with torch.no_grad():
        model(x)
    assert obs.stats["mixer.in_proj"].count == 4 * tokens
