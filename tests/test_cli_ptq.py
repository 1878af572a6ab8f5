"""`vmq calibrate`, `vmq quantize` and `vmq eval FILE` end to end on the shipped reference model."""

import json
from pathlib import Path

import pytest

from conftest import ROOT, one_error_line, run_vmq

FAST = ["--set", "calibration.num_images=32", "--set", "quantization.jlss.iterations=3",
        "--set", "quantization.truncation.num_images=16", "--set", "eval.limit=64"]




@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    out = tmp_path_factory.mktemp("stats") / "ref.safetensors"
    proc = run_vmq("calibrate", "--num-images", "32", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)
    assert summary["model"] == "vim_ref_cifar10" and summary["num_images"] == 32 and summary["layers"] == 6 * 6
    assert summary["tokens"] == [65]  # the distinct token counts of the layers: 8x8 patches and the cls token
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory, stats):
    out = tmp_path_factory.mktemp("packed") / "w4a8.safetensors"
    proc = run_vmq("quantize", "--recipe", ROOT / "configs" / "w4a8.yaml", *FAST, "--stats", stats, "--out", out,
                   "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_quantize_json_and_outputs(packed):
    out, result = packed
    assert result["scheme"] == "W4A8" and result["method"] == "ptq4vm" and result["eval_images"] == 64
    assert len(result["layers"]) == 36 and all(layer["snr_db"] > 5 for layer in result["layers"])
    assert {layer["a_strategy"] for layer in result["layers"]} == {"token_static"}
    assert 0 <= result["quant_top1"] <= 100 and result["file_bytes"] == out.stat().st_size
    # a 4-bit file is far smaller than the fp32 checkpoint
    assert out.stat().st_size < 0.4 * (ROOT / "vmq" / "assets" / "vim_ref_cifar10.safetensors").stat().st_size
    recipe_file = Path(result["recipe_out"])
    assert recipe_file == out.with_name("w4a8.recipe.yaml") and recipe_file.is_file()
    from vmq.quant.recipe import QuantRecipe
    from vmq.recipe import load_recipe

    r = load_recipe(recipe_file, QuantRecipe)
    assert r.model.name == "vim_ref_cifar10" and r.calibration.num_images == 32 and r.quantization.jlss.iterations == 3
    assert not list(out.parent.glob(".*tmp"))  # no temporary files left behind


def test_eval_packed_reproduces_quantize(packed):
    out, result = packed
    proc = run_vmq("eval", out, "--limit", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(proc.stdout)
    assert ev["top1"] == result["quant_top1"] and ev["num_images"] == 64
    assert ev["packed"]["reported_top1"] == result["quant_top1"] and ev["packed"]["scheme"] == "W4A8"
    proc = run_vmq("eval", out, "--limit", "64")
    assert proc.returncode == 0 and "W4A8 ptq4vm" in proc.stdout


def test_quantize_human_table(stats, tmp_path):
    proc = run_vmq("quantize", "--recipe", ROOT / "configs" / "w8a8.yaml", *FAST, "--stats", stats,
                   "--out", tmp_path / "w8.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "SNR dB" in proc.stdout and "top-1 quantized" in proc.stdout and "folded: norm" in proc.stdout
    # block index and layer names inside the block, whole when piped (80 columns)
    assert "│ 0     │ in_proj   │" in proc.stdout and "│ 5     │ dt_proj_b │" in proc.stdout
    assert "│ folded: x_proj_b │" in proc.stdout
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("sets,msg", [
    (["quantization.scheme.weights.num_bits=9"], "less than or equal to 8"),
    (["quantization.scheme.weights.num_bits=0"], "greater than or equal to 2"),
    (["quantization.targets=[]"], "at least 1 item"),
    (["quantization.jlss.iters=5"], "did you mean 'quantization.jlss.iterations'"),
    (["quantization.targets=[layers.0.mixer.conv1d]"], "not a linear layer"),
    (["calibration.num_images=100000"], "holds only 512"),
    (["model.name=vim_small"], "needs --checkpoint"),
    (["quantization.method=ptq4vn"], "unknown method 'ptq4vn'"),
    (["device=gpu"], "device must be cpu, cuda or cuda:N"),
])
def test_bad_recipes_fail_in_one_line_without_output(tmp_path, sets, msg):
    out = tmp_path / "x.safetensors"
    args = [a for s in sets for a in ("--set", s)]
    line = one_error_line(run_vmq("quantize", *args, "--out", out, "--no-eval"))
    assert msg in line
    assert list(tmp_path.iterdir()) == []


def test_stats_from_other_weights_and_bad_outputs(stats, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ROOT / "vmq" / "assets" / "vim_ref_cifar10.safetensors"))
    sd["layers.0.mixer.in_proj.weight"][0, 0] += 0.01
    other = tmp_path / "other.safetensors"
    save_file(sd, str(other))
    line = one_error_line(run_vmq("quantize", "--set", f"model.checkpoint={other}", "--stats", stats,
                                  "--out", tmp_path / "q.safetensors"))
    assert "other weights" in line and not (tmp_path / "q.safetensors").exists()
    line = one_error_line(run_vmq("quantize", "--stats", tmp_path / "missing.safetensors", "--out", tmp_path / "q.safetensors"))
    assert "not found" in line
    line = one_error_line(run_vmq("quantize", "--out", tmp_path / "no" / "such" / "dir.safetensors"))
    assert "does not exist" in line
    sd["layers.2.mixer.out_proj.weight"][1, 1] = float("nan")
    save_file(sd, str(other))
    line = one_error_line(run_vmq("quantize", "--set", f"model.checkpoint={other}", "--out", tmp_path / "q.safetensors",
                                  "--no-eval", *FAST))
    assert "NaN or Inf" in line and not (tmp_path / "q.safetensors").exists()
    line = one_error_line(run_vmq("calibrate", "--out", tmp_path / "s.safetensors", "--checkpoint", other,
                                  "--num-images", "8"))
    assert "NaN or Inf" in line and not (tmp_path / "s.safetensors").exists()


def test_eval_refuses_a_corrupt_packed_file(packed, tmp_path):
    out, _ = packed
    data = out.read_bytes()
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(data[: len(data) // 2])
    line = one_error_line(run_vmq("eval", broken, "--limit", "8"))
    assert "broken.safetensors" in line


@pytest.mark.slow
def test_ptq_targets_on_the_reference_model(tmp_path):
    """The README's claims: W8A8 within 0.3 points of FP; W4A8 within 2 points, following FP closer than RTN."""
    results = {}
    for name, recipe in (("w8a8", "w8a8.yaml"), ("w4a8", "w4a8.yaml"), ("w4a8-rtn", "w4a8-rtn.yaml")):
        proc = run_vmq("quantize", "--recipe", ROOT / "configs" / recipe, "--out", tmp_path / f"{name}.safetensors",
                       "--json")
        assert proc.returncode == 0, proc.stderr
        results[name] = json.loads(proc.stdout)
    fp = results["w8a8"]["fp_top1"]
    assert results["w8a8"]["quant_top1"] >= fp - 0.3
    assert results["w4a8"]["quant_top1"] >= fp - 2.0
    assert results["w4a8"]["logit_snr_db"] > results["w4a8-rtn"]["logit_snr_db"]
    for r in results.values():
        assert 90.0 <= r["top1_agreement"] <= 100.0


def test_packed_file_is_known_by_its_metadata(packed, tmp_path):
    out, result = packed
    renamed = tmp_path / "model.bin"
    renamed.write_bytes(out.read_bytes())
    proc = run_vmq("eval", "--checkpoint", renamed, "--limit", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["top1"] == result["quant_top1"]
    line = one_error_line(run_vmq("quantize", "--set", f"model.checkpoint={renamed}", "--out", tmp_path / "q.safetensors"))
    assert "packed (quantized) file" in line


def test_calibration_never_reads_an_eval_split(tmp_path):
    from PIL import Image

    import numpy as np

    for split in ("val",):
        d = tmp_path / "root" / split / "cat"
        d.mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((32, 32, 3), i * 40, dtype=np.uint8)).save(d / f"{i}.png")
    line = one_error_line(run_vmq("calibrate", "--data", tmp_path / "root", "--num-images", "4",
                                  "--out", tmp_path / "s.safetensors"))
    assert "no training split" in line
    (tmp_path / "root" / "val").rename(tmp_path / "root" / "train")
    proc = run_vmq("calibrate", "--data", tmp_path / "root", "--num-images", "4", "--out", tmp_path / "s.safetensors",
                   "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["data"].endswith("train")


def test_same_inputs_same_bytes(stats, tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.safetensors"
        proc = run_vmq("quantize", "--recipe", ROOT / "configs" / "w6a6.yaml", *FAST, "--stats", stats, "--no-eval",
                       "--out", out)
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
