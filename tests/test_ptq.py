"""PTQ: recipe checks, target resolution, calibration stats, the block-by-block pipeline, packing."""

import copy

import pytest
import timm
import torch

import vmq.models  # noqa: F401
from vmq.activations import ActivationStore
from vmq.calib import CalibStats, LinearObserver, collect_stats
from vmq.compress import compress_model, method_for
from vmq.compress.engine import _tail
from vmq.compress.methods.uniform import LayerReport
from vmq.distributed import Part
from vmq.errors import VmqError
from vmq.layers import KINDS, QuantizedLinear
from vmq.models import family_of
from vmq.modules import set_module
from vmq.pack.format import load_packed, read_metadata, save_packed
from vmq.quant.jlss import logit_weights
from vmq.quant.recipe import QuantRecipe
from vmq.recipe import parse_recipe

LAYERS = ["in_proj", "x_proj", "x_proj_b", "dt_proj", "dt_proj_b", "out_proj"]


def resolve_targets(model, stage):
    return method_for("quantization", stage).targets(model, family_of(model))


def quantize_model(model, stage, images, stats, batch_size=8, seed=0, method=None):
    return compress_model(model, method or method_for("quantization", stage), images, stats, batch_size=batch_size,
                          seed=seed)


def recipe(**quant):
    jlss = quant.pop("jlss", {"iterations": 4, "batch_size": 8})
    return parse_recipe({"quantization": {"jlss": jlss, "truncation": {"num_images": 8, "grid": 20}, **quant}},
                        QuantRecipe)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    model.vmq_name = "test_vim"
    images = torch.randn(16, 3, 32, 32)
    return model, images, collect_stats(model, images, batch_size=8)


def test_recipe_presets_and_bad_settings():
    r = recipe(scheme="w4a8")
    assert (r.quantization.scheme.weights.num_bits, r.quantization.scheme.input_activations.num_bits) == (4, 8)
    assert recipe(scheme="W4A16", method="rtn").quantization.scheme.input_activations is None
    bad = [
        ({"scheme": {"weights": {"num_bits": 0}}}, "num_bits"),
        ({"scheme": {"weights": {"num_bits": 9}}}, "less than or equal to 8"),
        ({"scheme": {"input_activations": {"num_bits": 1}}}, "num_bits"),
        ({"targets": []}, "at least 1 item"),
        ({"scheme": "W3A5"}, "unknown scheme preset"),
        ({"targets": ["re:("]}, "bad regular expression"),
        ({"smoothing": {"alpha": 2}}, "alpha"),
        ({"jlss": {"iterations": 0}}, "iterations"),
        ({"jlss": {"loss": "l1"}}, "loss"),
        ({"jlss": {"target": "teacher"}}, "target"),
        ({"w_bits": 4}, "unknown recipe key 'quantization.w_bits'"),
    ]
    for quant, msg in bad:
        with pytest.raises(VmqError, match=msg):
            parse_recipe({"quantization": quant}, QuantRecipe)
    # the method is checked against its stage by method_for (the registry), not at parse time
    for quant, msg in (({"method": "gptq"}, "unknown method"),
                       ({"method": "pts", "scheme": "W4A16"}, "needs scheme.input_activations")):
        with pytest.raises(VmqError, match=msg):
            method_for("quantization", parse_recipe({"quantization": quant}, QuantRecipe).quantization)


def test_targets_and_ignore(tiny):
    model, _, _ = tiny
    stage = recipe().quantization
    names = resolve_targets(model, stage)
    assert len(names) == len(model.layers) * 6
    stage = recipe(ignore=["re:\\.x_proj", "layers.0.mixer.out_proj"]).quantization
    names = resolve_targets(model, stage)
    assert "layers.0.mixer.out_proj" not in names and not any(".x_proj" in n for n in names)
    assert "layers.1.mixer.out_proj" in names
    for targets, msg in ((["layers.9.mixer.in_proj"], "no layer named"), (["head"], "only linear layers inside blocks"),
                         (["layers.0.norm"], "not a linear layer"), (["re:nothing_here"], "match no linear layer")):
        with pytest.raises(VmqError, match=msg):
            resolve_targets(model, recipe(targets=targets).quantization)
    with pytest.raises(VmqError, match="no layer named"):
        resolve_targets(model, recipe(ignore=["layers.0.mixer.inproj"]).quantization)


def test_stats_ranges_are_exact_after_smoothing(tiny):
    model, images, stats = tiny
    fam = family_of(model)
    prefix, block = fam.blocks(model)[0]
    assert prefix == "layers.0." and block is model.layers[0]
    io = fam.embed_batched(model, images, 32)
    with LinearObserver(block, ["mixer.out_proj"], keep_samples=16) as obs:
        fam.run_batched(block, io, 32)
    x = obs.stats["mixer.out_proj"].sample_tensor()
    st = stats.layers["layers.0.mixer.out_proj"]
    s = torch.rand(x.shape[-1]) + 0.5
    lo, hi = st.ranges(s, per_token=True)
    torch.testing.assert_close(lo, (x / s).amin(dim=(0, 2)))
    torch.testing.assert_close(hi, (x / s).amax(dim=(0, 2)))
    lo, hi = st.ranges(None, per_token=False)
    assert lo.item() == x.min().item() and hi.item() == x.max().item()
    torch.testing.assert_close(st.channel_absmax, x.abs().amax(dim=(0, 1)))
    torch.testing.assert_close(st.second_moment, x.pow(2).mean(dim=(0, 1)))
    assert st.count == 16 * model.cfg.num_tokens


def test_stats_file_roundtrip_and_model_check(tiny, tmp_path):
    model, _, stats = tiny
    path = tmp_path / "stats.safetensors"
    stats.save(path)
    loaded = CalibStats.load(path)
    loaded.check(model)
    for name, st in stats.layers.items():
        assert torch.equal(loaded.layers[name].max, st.max) and loaded.layers[name].count == st.count
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.layers[0].mixer.in_proj.weight[0, 0] += 1e-3
    with pytest.raises(VmqError, match="other weights"):
        loaded.check(other)
    other = timm.create_model("test_vim_stride").eval()
    other.vmq_name = "test_vim_stride"
    with pytest.raises(VmqError, match="calibrated on model 'test_vim'"):
        loaded.check(other)
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(VmqError, match="cannot read calibration stats"):
        CalibStats.load(tmp_path / "bad.safetensors")


def test_nan_in_calibration_is_refused(tiny):
    model, images, _ = tiny
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.layers[1].mixer.in_proj.weight[3, 3] = float("nan")
    with pytest.raises(VmqError, match="NaN or Inf"):
        collect_stats(broken, images, batch_size=8)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(VmqError, match="NaN or Inf"):
        collect_stats(model, bad, batch_size=8)


@pytest.mark.parametrize("method,scheme", [("rtn", {"weights": {"num_bits": 4, "strategy": "tensor"},
                                                     "input_activations": {"num_bits": 8, "strategy": "tensor_static"}}),
                                           ("smoothquant", "W8A8"), ("pts", "W6A6"), ("ptq4vm", "W4A8"),
                                           ("rtn", "W4A16"),
                                           ("pts", {"input_activations": {"num_bits": 8, "strategy": "token_dynamic"}})])
def test_quantize_fake_and_integer_logits_agree(tiny, method, scheme):
    """The frozen integer model (smoothing folded) matches the fake-quant layers it came from."""
    model, images, stats = tiny
    r = recipe(method=method, scheme=scheme)
    qmodel = copy.deepcopy(model)
    fake = {}
    engine_method = method_for("quantization", r.quantization)
    finish = engine_method.finish

    def keep_fake_layers(job, layers, frozen, info):  # copies of the fake-quant layers as frozen, before folding
        fake.update({job.prefix + name: copy.deepcopy(q) for name, q in layers.items()})
        finish(job, layers, frozen, info)

    engine_method.finish = keep_fake_layers
    torch.manual_seed(0)
    with torch.enable_grad():
        reports = quantize_model(qmodel, r.quantization, images, stats, batch_size=8, method=engine_method)
    targets = resolve_targets(model, r.quantization)
    assert [rep.name for rep in reports] == targets and sorted(fake) == sorted(targets)
    assert all(isinstance(rep, LayerReport) for rep in reports)
    assert all(isinstance(qmodel.get_submodule(n), QuantizedLinear) for n in targets)
    fake_model = copy.deepcopy(model)
    for name, layer in fake.items():
        set_module(fake_model, name, layer.eval())
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        lq, lf, lfp = qmodel(x), fake_model(x), model(x)
    torch.testing.assert_close(lq, lf, atol=2e-3 * lfp.abs().max().item(), rtol=0)
    if method != "rtn":  # smoothing of in_proj went into the norm, dt_proj's into x_proj's dt rows
        assert not torch.equal(qmodel.layers[0].norm.weight, model.layers[0].norm.weight)
        assert qmodel.get_submodule("layers.0.mixer.in_proj").smooth_scale is None
        assert qmodel.get_submodule("layers.0.mixer.out_proj").smooth_scale is not None
        assert {rep.smoothing for rep in reports if rep.name.endswith("dt_proj")} == {"folded into layers.0.mixer.x_proj",
                                                                                       "folded into layers.1.mixer.x_proj"}
    # JLSS trades single-layer fidelity for the block output, so only the other methods get a floor
    assert all(rep.snr_db > (0 if method == "ptq4vm" else 5) for rep in reports)


@pytest.mark.parametrize("loss,target", [("cosine", "fp_input"), ("mse", "fp_input"), ("cosine+mse", "quant_input"),
                                         ("logit-weighted", "fp_input")])
def test_jlss_lowers_the_block_loss(tiny, loss, target):
    model, images, stats = tiny
    qmodel = copy.deepcopy(model)
    r = recipe(method="ptq4vm", scheme="W4A8",
               jlss={"iterations": 30, "batch_size": 8, "lr_scale": 1e-3, "loss": loss, "target": target, "holdout": 0})
    with torch.no_grad():  # JLSS turns gradients on for itself
        reports = quantize_model(qmodel, r.quantization, images, stats, batch_size=8)
    for rep in reports:
        assert rep.jlss_loss_after < rep.jlss_loss_before


def test_jlss_never_leaves_a_block_worse_than_its_start(tiny):
    # a learning rate far too large for the step sizes: every block's learning ends above its start,
    # so the starting parameters come back (the loss reported after equals the one before)
    model, images, stats = tiny
    qmodel = copy.deepcopy(model)
    r = recipe(method="ptq4vm", scheme="W4A8", jlss={"iterations": 5, "batch_size": 8, "lr_scale": 10.0})
    with torch.no_grad():
        reports = quantize_model(qmodel, r.quantization, images, stats, batch_size=8)
    for rep in reports:
        assert rep.jlss_loss_after <= rep.jlss_loss_before


def test_holdout_split_takes_whole_calibration_batches_from_the_end():
    from vmq.optimise import holdout_split

    assert holdout_split(256, 32, 0.25) == 192  # 8 batches: the last 2 held out
    assert holdout_split(250, 32, 0.25) == 192  # the short last batch is one of them
    assert holdout_split(16, 8, 0.25) == 8  # two batches: one each
    assert holdout_split(8, 8, 0.25) == 8 and holdout_split(256, 32, 0) == 256  # nothing to hold out
    assert holdout_split(64, 8, 0.99) == 8  # at least one batch to learn from


def test_learning_never_draws_held_out_images(tiny):
    from vmq.optimise import BlockTrainer

    model, _, _ = tiny
    trainer = BlockTrainer(family_of(model), model.layers[0], (torch.zeros(40, 3, 4), None), torch.zeros(40, 3, 4),
                           None, 16, 0, [], learn_items=24)
    drawn = [next(trainer.batches) for _ in range(50)]
    assert {i for batch in drawn for i in batch} == set(range(24)) and all(len(b) == 16 for b in drawn)


@pytest.mark.parametrize("select", ["logits", "block"])
def test_jlss_keeps_the_parameters_best_on_held_out_images(tiny, select):
    model, images, stats = tiny
    r = recipe(method="ptq4vm", scheme="W4A8", jlss={"iterations": 20, "batch_size": 8, "lr_scale": 1e-3,
                                                     "holdout": 0.5, "check_every": 5, "select": select})
    with torch.no_grad():
        reports = quantize_model(copy.deepcopy(model), r.quantization, images, stats, batch_size=8)
    for rep in reports:  # 16 images in batches of 8: learning on the first 8, checks on the other 8
        assert rep.jlss_holdout_after <= rep.jlss_holdout_before and rep.jlss_steps_kept in (0, 5, 10, 15, 20)
        if rep.jlss_steps_kept == 0:
            assert rep.jlss_holdout_after == rep.jlss_holdout_before and rep.jlss_loss_after == rep.jlss_loss_before
    assert any(rep.jlss_steps_kept > 0 and rep.jlss_holdout_after < rep.jlss_holdout_before for rep in reports)
    # a learning rate far too large: no check ever beats the start, which every block keeps
    r = recipe(method="ptq4vm", scheme="W4A8", jlss={"iterations": 5, "batch_size": 8, "lr_scale": 10.0})
    with torch.no_grad():
        reports = quantize_model(copy.deepcopy(model), r.quantization, images, stats, batch_size=8)
    assert {rep.jlss_steps_kept for rep in reports} == {0}
    assert all(rep.jlss_loss_after == rep.jlss_loss_before for rep in reports)


def test_held_out_logit_check_is_the_models_logit_error(tiny):
    from vmq.compress.engine import _tail
    from vmq.distributed import Part
    from vmq.quant.jlss import logit_error

    model, images, _ = tiny
    fam = family_of(model)
    with torch.no_grad():
        fp = model(images)
        io = fam.embed(model, images)
        blocks = fam.blocks(model)
        noisy = (io[0] + 0.05 * torch.randn_like(io[0]), io[1])  # the first block's inputs, disturbed
        out = fam.head(model, fam.run_block(blocks[1][1], fam.run_block(blocks[0][1], noisy)))
        expected = ((out - fp).double().pow(2)[8:].sum() / fp.double().pow(2)[8:].sum()).item()
        got = logit_error(fam, blocks[0][1], noisy, _tail(model, fam, blocks[1:]), fp, Part.whole(16, 8), (8, 16)).item()
    assert got == pytest.approx(expected, rel=1e-5) and got > 0  # (batches of 8 there, 16 here: fp32 rounding)


def _first_block(tiny):
    """The family, the FP logits, the first block's FP output and the tail after it."""
    model, images, _ = tiny
    fam = family_of(model)
    with torch.no_grad():
        blocks = fam.blocks(model)
        out = fam.run_block(blocks[0][1], fam.embed(model, images))
        return fam, model(images), out, _tail(model, fam, blocks[1:])


def test_logit_weights_give_the_logit_change_of_one_output_element(tiny):
    # w[n, t, c] eps^2 is, to first order, the relative squared change of the logits when block
    # output element (n, t, c) moves by eps, relative to the mean |z_fp|^2
    fam, fp, out, tail = _first_block(tiny)
    with torch.no_grad():
        w = logit_weights(fam, out, tail, fp, Part.whole(16, 8), ActivationStore(torch.device("cpu")))
        assert w.shape == out[0].shape and bool((w >= 0).all()) and w.device == out[0].device
        energy = fp.double().pow(2).sum(1).mean()
        eps = 1e-2
        for n, t, c in ((3, 5, 7), (10, out[0].shape[1] // 2, 0), (15, 0, 11)):
            h = out[0].clone()
            h[n, t, c] += eps
            moved = (tail((h, out[1])) - tail(out)).double().pow(2).sum() / energy
            assert moved.item() == pytest.approx(w[n, t, c].item() * eps ** 2, rel=0.05)


def test_logit_weights_with_fewer_probes_than_classes_estimate_the_exact_ones(tiny):
    fam, fp, out, tail = _first_block(tiny)
    store = ActivationStore(torch.device("cpu"))
    with torch.no_grad():
        exact = logit_weights(fam, out, tail, fp, Part.whole(16, 8), store, probes=fp.shape[-1])
        one = logit_weights(fam, out, tail, fp, Part.whole(16, 8), store, probes=2, seed=3)
        assert torch.equal(one, logit_weights(fam, out, tail, fp, Part.whole(16, 8), store, probes=2, seed=3))
        mean = sum(logit_weights(fam, out, tail, fp, Part.whole(16, 8), store, probes=5, seed=s)
                   for s in range(20)) / 20
    assert not torch.equal(one, exact) and bool((one >= 0).all())
    assert mean.sum().item() == pytest.approx(exact.sum().item(), rel=0.1)
    assert torch.corrcoef(torch.stack([mean.flatten(), exact.flatten()]))[0, 1] > 0.9


def test_packed_roundtrip_is_exact_and_deterministic(tiny, tmp_path):
    model, images, stats = tiny
    files = []
    for i in range(2):
        qmodel = copy.deepcopy(model)
        r = recipe(method="ptq4vm", scheme="W4A8")
        torch.manual_seed(0)
        with torch.enable_grad():
            quantize_model(qmodel, r.quantization, images, stats, batch_size=8)
        path = tmp_path / f"q{i}.safetensors"
        save_packed(qmodel, path, r.model_dump(mode="json"), {"quant_top1": 1.0})
        files.append(path)
    assert files[0].read_bytes() == files[1].read_bytes()  # same inputs, same bytes
    loaded, meta = load_packed(files[0])
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), qmodel(x))
    assert meta["model"]["name"] == "test_vim" and meta["model"]["config"] == model.cfg.to_dict()
    assert meta["model"]["family"] == "vim"
    assert meta["recipe"]["quantization"]["method"] == "ptq4vm"
    assert KINDS["int"] is QuantizedLinear
    assert isinstance(loaded.get_submodule("layers.0.mixer.in_proj"), QuantizedLinear)
    assert meta["layers"]["layers.0.mixer.in_proj"] == {"kind": "int", "w_bits": 4, "w_strategy": "channel",
                                                        "a_bits": 8, "a_strategy": "token_static"}
    from safetensors import safe_open

    with safe_open(str(files[0]), framework="pt") as f:
        keys = set(f.keys())
        packed = f.get_tensor("layers.0.mixer.in_proj.weight_packed")
    n, k = qmodel.layers[0].mixer.in_proj.weight.shape
    assert packed.dtype == torch.uint8 and packed.numel() == n * k // 2  # two 4-bit weights per byte
    assert "layers.0.mixer.in_proj.weight" not in keys and "layers.0.mixer.in_proj.input_scale" in keys
    assert "layers.0.mixer.out_proj.smooth_scale" in keys and "layers.0.mixer.in_proj.smooth_scale" not in keys
    assert read_metadata(files[0])["format_version"] == "2.0"


def test_packed_8bit_uses_int8_weight_and_bad_files(tiny, tmp_path):
    model, images, stats = tiny
    qmodel = copy.deepcopy(model)
    r = recipe(method="smoothquant", scheme="W8A8")
    quantize_model(qmodel, r.quantization, images, stats, batch_size=8)
    path = tmp_path / "w8.safetensors"
    save_packed(qmodel, path, r.model_dump(mode="json"))
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    assert tensors["layers.0.mixer.in_proj.weight"].dtype == torch.int8
    meta = {"vmq": __import__("safetensors").safe_open(str(path), framework="pt").metadata()["vmq"]}
    del tensors["layers.1.mixer.out_proj.weight_scale"]
    save_file(tensors, str(tmp_path / "broken.safetensors"), metadata=meta)
    with pytest.raises(VmqError, match="payload checksum mismatch"):
        load_packed(tmp_path / "broken.safetensors")
    with pytest.raises(VmqError, match="lacks tensor layers.1.mixer.out_proj.weight_scale"):
        load_packed(tmp_path / "broken.safetensors", verify=False)
    with pytest.raises(VmqError, match="not a vmq packed file"):
        save_file({"a": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
        load_packed(tmp_path / "plain.safetensors")
