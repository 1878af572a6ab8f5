"""Bounded memory: --max-memory and --offload-dir place block activations off the device, without
changing the result; bad sizes fail in one line; the offload folder is removed, also after an error."""

import copy
import json

import pytest
import timm
import torch

import vmq
import vmq.models  # noqa: F401
from conftest import ROOT, one_error_line, run_vmq
from vmq.activations import (ActivationStore, DiskTensor, HostTensor, MemoryBudget, io_all_finite, parse_size,
                             where_stored)
from vmq.calib import collect_stats
from vmq.compress import compress_model, method_for
from vmq.compress.methods.ptq4vm import PTQ4VM
from vmq.errors import VmqError
from vmq.models import family_of
from vmq.models.family import io_batches, io_slice
from vmq.quant.recipe import QuantRecipe
from vmq.recipe import parse_recipe

FAST = ["--set", "calibration.num_images=16", "--set", "calibration.batch_size=8",
        "--set", "quantization.jlss.iterations=3", "--set", "quantization.jlss.batch_size=8",
        "--set", "quantization.truncation.num_images=8", "--set", "quantization.truncation.grid=10",
        "--no-eval", "--json"]


@pytest.mark.parametrize("text, size", [("8GB", 8 * 10 ** 9), ("512MiB", 512 * 2 ** 20), ("1.5GiB", 3 * 2 ** 29),
                                        ("2g", 2 * 2 ** 30), (" 100 kb ", 100_000), ("0", 0), ("4096", 4096),
                                        (".5KiB", 512), ("7B", 7), (12, 12)])
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text, msg", [("8XB", "unknown unit 'XB'"), ("", "is not a size"), ("GB", "is not a size"),
                                       ("-1GB", "is not a size"), ("1e9", "is not a size"),
                                       ("8 GB 2", "is not a size"), ("9" * 400 + "TB", "too large"),
                                       (-5, "cannot be negative"), (True, "expected a size")])
def test_bad_sizes(text, msg):
    with pytest.raises(VmqError, match=msg):
        parse_size(text)


def test_budget_checks(tmp_path):
    with pytest.raises(VmqError, match="needs --offload-dir"):
        MemoryBudget.of("1GB").check("cpu")
    MemoryBudget.of("1GB").check("cuda")  # host memory takes the rest
    (tmp_path / "file").write_text("x")
    with pytest.raises(VmqError, match="is not a folder"):
        MemoryBudget.of("1GB", tmp_path / "file").check("cpu")
    MemoryBudget.of("1GB", tmp_path / "new" / "deeper").check("cpu")  # made when first needed


def test_store_places_past_the_budget_and_reads_back(tmp_path):
    a = torch.randn(10, 5, 3)
    b = torch.randn(10, 5, 3)
    with ActivationStore("cpu", MemoryBudget(a.numel() * 4, tmp_path)) as store:
        io = store.collect(io_batches((a, None, b), 4), 10)
        assert where_stored(io) == ("device", None, "disk")  # the first fits the budget exactly, the second not
        assert isinstance(io[2], DiskTensor) and io[2].shape == b.shape and len(list(tmp_path.iterdir())) == 1
        assert torch.equal(io[0], a)
        for index in (slice(0, 10), slice(3, 7), torch.tensor([9, 0, 1, 2, 5, 5]), torch.tensor([], dtype=torch.long)):
            assert torch.equal(io_slice(io, index)[2], b[index])
        assert io_all_finite(io)
        assert store.report() == {"budget_bytes": 600, "device_peak_bytes": 600, "host_bytes": 0,
                                  "offloaded_bytes": 600}
        del io
        assert store.on_device == 0  # the device bytes are given back with the tensors
        bad = store.collect([(torch.full((1, 200), float("nan")),)], 1)  # past the budget: to disk
        assert where_stored(bad) == ("disk",) and not io_all_finite(bad)
    assert list(tmp_path.iterdir()) == []


def test_host_tensor_reads_back():
    data = torch.randn(6, 4)
    t = HostTensor(tuple(data.shape), data.dtype, torch.device("cpu"))
    t.write(0, data[:4])
    t.write(4, data[4:])
    assert torch.equal(t[slice(1, 5)], data[1:5]) and torch.equal(t[torch.tensor([5, 0, 3])], data[[5, 0, 3]])


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    model.vmq_name = "test_vim"
    return model, torch.randn(16, 3, 32, 32)


def _quantize(model, images, budget, target="fp_input"):
    recipe = parse_recipe({"quantization": {"method": "ptq4vm", "scheme": "W4A8", "truncation": {"num_images": 8,
                           "grid": 20}, "jlss": {"iterations": 3, "batch_size": 8, "target": target}}}, QuantRecipe)
    model = copy.deepcopy(model)
    with ActivationStore("cpu", budget) as store:
        stats = collect_stats(model, images, 8, store=store)
        compress_model(model, method_for("quantization", recipe.quantization), images, stats, 8, 0, store=store)
        placed = dict(store.placed)
    return model.state_dict(), placed


@pytest.mark.parametrize("target", ["fp_input", "quant_input"])
def test_offloaded_compression_is_identical(tiny, tmp_path, target):
    model, images = tiny
    free, placed = _quantize(model, images, MemoryBudget(), target)
    assert placed["disk"] == 0 and placed["device"] > 0
    one_tensor = 16 * family_of(model).embed(model, images[:1])[0][0].numel() * 4
    for budget in (MemoryBudget(0, tmp_path), MemoryBudget(one_tensor, tmp_path)):
        bounded, placed = _quantize(model, images, budget, target)
        assert placed["disk"] > 0 and (placed["device"] == 0) == (budget.max_bytes == 0)
        assert bounded.keys() == free.keys() and all(torch.equal(bounded[k], free[k]) for k in free)
        assert list(tmp_path.iterdir()) == []


def test_vq_through_the_api_is_identical(tiny, tmp_path):
    model, images = tiny
    recipe = {"vq": {"method": "vimvq", "codebook": {"dim": 2, "size": 8}, "kmeans": {"iterations": 3},
                     "search": {"iterations": 6, "batch_size": 4}}, "calibration": {"batch_size": 8}}
    free = vmq.compress(recipe, model=copy.deepcopy(model), images=images, evaluate_model=False)
    bounded = vmq.compress(recipe, model=copy.deepcopy(model), images=images, evaluate_model=False,
                           max_memory="0B", offload_dir=tmp_path)
    assert free.activations["offloaded_bytes"] == 0 and free.activations["budget_bytes"] is None
    assert bounded.activations["device_peak_bytes"] == 0 and bounded.activations["offloaded_bytes"] > 0
    a, b = free.model.state_dict(), bounded.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert list(tmp_path.iterdir()) == []


def test_offload_folder_removed_after_an_error(tiny, tmp_path, monkeypatch):
    model, images = tiny
    seen = []

    def failing_fit(self, job, layers):
        seen.append(sorted(p.name for p in (tmp_path / "off").iterdir()))
        raise RuntimeError("stop")

    monkeypatch.setattr(PTQ4VM, "fit", failing_fit)
    with pytest.raises(RuntimeError, match="stop"):
        vmq.compress({"quantization": {"method": "ptq4vm"}}, model=copy.deepcopy(model), images=images,
                     evaluate_model=False, max_memory=0, offload_dir=tmp_path / "off")
    assert len(seen) == 1 and len(seen[0]) == 1 and seen[0][0].startswith("vmq-activations-")
    assert list((tmp_path / "off").iterdir()) == []


def test_cli_packed_bytes_do_not_depend_on_the_budget(tmp_path):
    recipe = ROOT / "configs" / "w4a8.yaml"
    free = run_vmq("quantize", "--recipe", recipe, *FAST, "--out", tmp_path / "free.safetensors")
    assert free.returncode == 0, free.stderr
    assert json.loads(free.stdout)["activations"]["offloaded_bytes"] == 0
    bounded = run_vmq("quantize", "--recipe", recipe, *FAST, "--out", tmp_path / "bounded.safetensors",
                      "--max-memory", "1MB", "--offload-dir", tmp_path / "off")
    assert bounded.returncode == 0, bounded.stderr
    report = json.loads(bounded.stdout)["activations"]
    assert report["budget_bytes"] == 10 ** 6 and 0 < report["device_peak_bytes"] <= 10 ** 6
    assert report["offloaded_bytes"] > 0
    assert (tmp_path / "free.safetensors").read_bytes() == (tmp_path / "bounded.safetensors").read_bytes()
    assert list((tmp_path / "off").iterdir()) == []


def test_cli_calibrate_with_a_budget(tmp_path):
    free = run_vmq("calibrate", "--num-images", "16", "--out", tmp_path / "a.safetensors", "--json")
    bounded = run_vmq("calibrate", "--num-images", "16", "--out", tmp_path / "b.safetensors", "--json",
                      "--max-memory", "0", "--offload-dir", tmp_path / "off")
    assert free.returncode == 0 and bounded.returncode == 0, free.stderr + bounded.stderr
    assert json.loads(bounded.stdout)["activations"]["device_peak_bytes"] == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert list((tmp_path / "off").iterdir()) == []


@pytest.mark.parametrize("command, args, msg", [
    ("quantize", ["--max-memory", "8XB"], "--max-memory: unknown unit 'XB'"),
    ("vq", ["--max-memory", "lots"], "--max-memory: 'lots' is not a size"),
    ("calibrate", ["--max-memory", "1GB"], "--max-memory on cpu needs --offload-dir")])
def test_cli_bad_budgets_fail_in_one_line(tmp_path, command, args, msg):
    line = one_error_line(run_vmq(command, *args, "--out", tmp_path / "x.safetensors"))
    assert msg in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.gpu
def test_cuda_host_offload_is_identical(tiny):
    model, images = tiny
    results = []
    for budget in (MemoryBudget(), MemoryBudget(0)):
        m = copy.deepcopy(model).cuda()
        with ActivationStore("cuda", budget) as store:
            stats = collect_stats(m, images, 8, store=store)
            io = store.embed(family_of(m), m, images, 8)
            assert where_stored(io)[0] == ("device" if budget.max_bytes is None else "host")
            assert io[0].data.is_pinned() if budget.max_bytes == 0 else io[0].is_cuda
            recipe = parse_recipe({"quantization": {"method": "rtn", "scheme": "W8A8"}}, QuantRecipe)
            compress_model(m, method_for("quantization", recipe.quantization), images, stats, 8, 0, store=store)
        results.append({k: v.cpu() for k, v in m.state_dict().items()})
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
