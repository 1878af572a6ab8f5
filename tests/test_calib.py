"""Block-by-block calibration capture."""

import timm
import torch

import vmq.models  # noqa: F401
from vmq.calib import LinearObserver, embed_inputs, run_block


def test_block_by_block_reproduces_forward():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    x = torch.randn(5, 3, 32, 32)
    io = embed_inputs(model, x, batch_size=2)
    for block in model.layers:
        io = run_block(block, io, batch_size=3)
    hidden, residual = io
    with torch.no_grad():
        feats = model.norm_f(residual + hidden)[:, model.cfg.cls_position]
        torch.testing.assert_close(model.head(feats), model(x))


def test_observer_sees_every_projection_of_both_directions():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    x = torch.randn(4, 3, 32, 32)
    block = model.layers[0]
    names = ["mixer.in_proj", "mixer.x_proj", "mixer.x_proj_b", "mixer.dt_proj", "mixer.dt_proj_b", "mixer.out_proj"]
    with LinearObserver(block, names, keep_samples=3) as obs:
        run_block(block, embed_inputs(model, x), batch_size=2)
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
