"""The CLI on every family: `vmq eval` on an official checkpoint (model found from its keys),
`vmq quantize` / `vmq vq` on it, then `vmq eval FILE` and `vmq bench FILE` on the packed file."""

import json

import pytest

from conftest import noise_image_folder, run_vmq

# an official state dict per family (the parity fixtures) and the registered model it fits
CHECKPOINTS = {"vmamba_micro_strong": "test_vmamba", "vmamba_micro_v0": "test_vmamba_v0",
               "localvim_midcls_micro_strong": "test_local_vim_midcls", "localvmamba_micro_strong": "test_local_vmamba"}
FAST = ["--set", "calibration.num_images=8", "--set", "eval.limit=16"]


@pytest.fixture(scope="module")
def calibration_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    noise_image_folder(root / "train", ("airplane", "cat"), 4, 40)
    return root


@pytest.mark.parametrize("fixture, model", sorted(CHECKPOINTS.items()))
def test_eval_quantize_reload_bench(fixtures_dir, calibration_folder, tmp_path, fixture, model):
    ckpt = fixtures_dir / fixture / "state_dict.safetensors"
    r = run_vmq("eval", "--checkpoint", ckpt, "--limit", "16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"] == model  # found from the official keys

    out = tmp_path / "w8a8.safetensors"
    r = run_vmq("quantize", "--set", f"model.name={model}", "--set", f"model.checkpoint={ckpt}",
                "--set", "quantization.scheme=W8A8",
                "--set", "quantization.method=smoothquant", "--set", f"calibration.data={calibration_folder}",
                *FAST, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["model"] == model and all(layer["snr_db"] > 15 for layer in result["layers"])

    r = run_vmq("eval", out, "--limit", "16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top1"] == result["quant_top1"]

    r = run_vmq("bench", out, "--batch", "2", "--repeats", "1", "--warmup", "0", "--json")
    assert r.returncode == 0, r.stderr
    bench = json.loads(r.stdout)
    assert set(bench["models"]) == {"fp32", "W8A8"}


def test_vq_on_vmamba(fixtures_dir, calibration_folder, tmp_path):
    ckpt = fixtures_dir / "vmamba_micro_strong" / "state_dict.safetensors"
    out = tmp_path / "vq.safetensors"
    r = run_vmq("vq", "--set", "model.name=test_vmamba", "--set", f"model.checkpoint={ckpt}", "--set", "vq.method=kmeans",
                "--set", "vq.codebook.dim=1", "--set", "vq.codebook.size=4", "--set",
                f"calibration.data={calibration_folder}", *FAST, "--out", out, "--json")
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    r = run_vmq("eval", out, "--limit", "16", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["top1"] == result["quant_top1"]
