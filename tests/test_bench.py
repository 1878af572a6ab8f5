"""`vmq bench` and vmq.bench: interleaved timing, the floating-point twin of a packed model, errors."""

import json

import pytest
import timm
import torch

import vmq.models  # noqa: F401
from tests.conftest import run_vmq
from vmq.bench import BenchModel, float_twin, parse_batches, run_bench
from vmq.calib import collect_stats
from vmq.compress import compress_model, method_for
from vmq.errors import VmqError
from vmq.layers import QuantizedLinear
from vmq.models import family_of
from vmq.pack.format import save_packed
from vmq.quant.recipe import QuantRecipe
from vmq.recipe import parse_recipe


@pytest.fixture(scope="module")
def quantized():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    model.vmq_name = "test_vim"
    images = torch.randn(16, 3, 32, 32)
    stats = collect_stats(model, images, batch_size=8)
    r = parse_recipe({"quantization": {"method": "smoothquant", "scheme": "W8A8",
                                       "truncation": {"num_images": 8, "grid": 20}}}, QuantRecipe)
    import copy

    q = copy.deepcopy(model)
    compress_model(q, method_for("quantization", r.quantization), images, stats, batch_size=8, seed=0)
    q.vmq_name = "test_vim"
    return model, q, r


def test_float_twin_replaces_every_quantized_layer_and_computes_its_target(quantized):
    model, q, _ = quantized
    twin = float_twin(q)
    assert not any(isinstance(m, QuantizedLinear) for m in twin.modules())
    assert any(isinstance(m, QuantizedLinear) for m in q.modules())  # the original is untouched
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        # dequantized weights with smoothing folded in: close to the fp model, far closer than a wrong fold
        ref, out = model(x), twin(x)
    rel = (out - ref).norm() / ref.norm()
    assert rel < 0.05, rel
    layer = next(m for m in q.modules() if isinstance(m, QuantizedLinear) and m.smooth_scale is not None)
    lin = float_twin(torch.nn.Sequential(layer))[0]
    xs = torch.randn(3, 5, layer.in_features)
    expected = torch.nn.functional.linear(xs / layer.smooth_scale, layer.dequantized_weight(), layer.bias)
    torch.testing.assert_close(lin(xs), expected, rtol=1e-5, atol=1e-5)


def test_run_bench_reports_every_model_and_batch(quantized):
    model, q, _ = quantized
    models = [BenchModel("fp32", float_twin(q)), BenchModel("W8A8", q)]
    steps = []
    res = run_bench(models, 32, [1, 3], torch.device("cpu"), repeats=2, warmup=1, layers=True,
                    on_step=steps.append)
    assert res["baseline"] == "fp32" and [r["batch"] for r in res["results"]] == [1, 3]
    for row in res["results"]:
        assert set(row["models"]) == {"fp32", "W8A8"}
        assert row["models"]["fp32"]["speedup"] == 1.0
        for r in row["models"].values():
            assert r["latency_ms"] > 0 and r["latency_min_ms"] <= r["latency_ms"]
            assert r["images_per_sec"] == pytest.approx(row["batch"] / (r["latency_ms"] / 1e3), rel=1e-2)
            assert r["peak_memory_mb"] is None  # measured on CUDA only
        q_row = row["models"]["W8A8"]
        assert q_row["speedup"] == pytest.approx(row["models"]["fp32"]["latency_ms"] / q_row["latency_ms"], rel=1e-2)
    assert res["models"]["W8A8"]["weight_mb"] < res["models"]["fp32"]["weight_mb"]
    parts = res["layers"]["3"]["W8A8"]
    assert set(parts) == set(LAYER_GROUPS) | {"total", "rest (embeddings, residuals, hooks)"}
    assert parts["in_proj"] > 0 and parts["x_proj"] > 0 and parts["mixer other (conv, scan, gates)"] > 0
    assert sum(v for k, v in parts.items() if k != "total") == pytest.approx(parts["total"], rel=0.05, abs=0.05)
    assert any("repeat 2/2" in s for s in steps)
    # hooks are removed after the per-layer pass
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in q.modules())


LAYER_GROUPS = ("patch_embed", "in_proj", "x_proj", "dt_proj", "out_proj", "mixer other (conv, scan, gates)",
                "norms", "head")


def test_layer_groups():
    family = family_of(timm.create_model("test_vim"))
    _group = family.bench_group
    assert _group("layers.3.mixer.x_proj_b") == "x_proj" and _group("layers.0.mixer") == "mixer"
    assert _group("layers.1.norm") == "norms" and _group("norm_f") == "norms" and _group("head") == "head"
    assert _group("layers.0.mixer.conv1d") is None and _group("layers.0") is None
    assert family.bench_groups.order == LAYER_GROUPS
    label, inner = family.bench_groups.remainders["mixer"]
    assert label == "mixer other (conv, scan, gates)" and set(inner) == {"in_proj", "x_proj", "dt_proj", "out_proj"}


def test_bad_arguments():
    assert parse_batches("1, 8,64") == [1, 8, 64]
    for bad in ("0", "1,x", "", "-2"):
        with pytest.raises(VmqError, match="--batch"):
            parse_batches(bad)
    with pytest.raises(VmqError):
        run_bench([], 32, [1], torch.device("cpu"))


def test_cli_bench_packed_file_json_and_table(quantized, tmp_path):
    _, q, r = quantized
    path = tmp_path / "q.safetensors"
    save_packed(q, path, r.model_dump(mode="json"), {"scheme": "W8A8"})
    proc = run_vmq("bench", path, "--batch", "1,2", "--repeats", "2", "--warmup", "1", "--threads", "1", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)  # stdout is JSON alone
    assert res["model"] == "test_vim" and res["threads"] == 1 and res["baseline"] == "fp32"
    assert list(res["models"]) == ["fp32", "W8A8"] and res["models"]["fp32"]["scan"] == "vmq multi_scan"
    assert [row["batch"] for row in res["results"]] == [1, 2]
    import platform

    glibc = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
    assert res["allocator"] == ("glibc, freed memory retained" if glibc else "default")
    proc = run_vmq("bench", path, "--batch", "1", "--repeats", "1", "--layers")
    assert proc.returncode == 0, proc.stderr
    assert "vmq bench: test_vim" in proc.stdout and "W8A8" in proc.stdout and "per-layer ms" in proc.stdout


def test_cli_bench_float_model_alone_and_errors(tmp_path):
    proc = run_vmq("bench", "--model", "test_vim", "--batch", "2", "--repeats", "1", "--warmup", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert list(res["models"]) == ["fp32"] and res["results"][0]["models"]["fp32"]["latency_ms"] > 0
    for args, msg in ((["--batch", "0"], "--batch"), ([str(tmp_path / "missing.safetensors")], "not found"),
                      (["--model", "no_such_vim"], "no_such_vim")):
        proc = run_vmq("bench", *args)
        assert proc.returncode != 0
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and msg in lines[0], proc.stderr
    if not torch.cuda.is_available():
        proc = run_vmq("bench", "--device", "cuda")
        assert proc.returncode == 1 and "no CUDA device" in proc.stderr


def test_retain_freed_memory_applies_once_on_glibc():
    import platform

    from vmq.runtime import retain_freed_memory

    applied = retain_freed_memory()
    assert retain_freed_memory() is applied  # once per process
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert applied
    # (its effect, no page faults for reused activations, is measured by vmq bench / benchmarks/kernels.py:
    # fault counts in a unit test would depend on the host's memory reclaim)
