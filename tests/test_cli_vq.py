"""`vmq vq` and `vmq eval FILE` end to end on the shipped reference model."""

import json
from pathlib import Path

import pytest

from conftest import ROOT, one_error_line, run_vmq

FAST = ["--set", "calibration.num_images=32", "--set", "vq.search.iterations=10", "--set", "vq.kmeans.iterations=5",
        "--set", "eval.limit=64"]


@pytest.fixture(scope="module")
def stats(tmp_path_factory):
    out = tmp_path_factory.mktemp("vqstats") / "ref.safetensors"
    proc = run_vmq("calibrate", "--num-images", "32", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return out


@pytest.fixture(scope="module")
def packed(tmp_path_factory, stats):
    out = tmp_path_factory.mktemp("vqpacked") / "vq2.safetensors"
    proc = run_vmq("vq", "--recipe", ROOT / "configs" / "vq-2bit.yaml", *FAST, "--stats", stats, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    return out, json.loads(proc.stdout)


def test_vq_json_and_outputs(packed):
    out, result = packed
    assert result["method"] == "vimvq" and result["eval_images"] == 64 and len(result["layers"]) == 36
    assert result["code_bits_per_weight"] == 2.0 and 2.0 < result["bits_per_weight"] < 2.5
    assert all(layer["snr_db"] > 0 and layer["loss_final"] is not None for layer in result["layers"])
    assert 0 <= result["quant_top1"] <= 100 and result["file_bytes"] == out.stat().st_size
    # 2-bit codes: far smaller than the fp32 checkpoint (norms, conv1d, embeddings and head stay fp32)
    assert out.stat().st_size < 0.3 * (ROOT / "vmq" / "assets" / "vim_ref_cifar10.safetensors").stat().st_size
    from vmq.recipe import load_recipe
    from vmq.vq.recipe import VQRecipe

    r = load_recipe(Path(result["recipe_out"]), VQRecipe)
    assert r.model.name == "vim_ref_cifar10" and r.vq.search.iterations == 10
    assert not list(out.parent.glob(".*tmp"))


def test_eval_packed_reproduces_vq(packed):
    out, result = packed
    proc = run_vmq("eval", out, "--limit", "64", "--json")
    assert proc.returncode == 0, proc.stderr
    ev = json.loads(proc.stdout)
    assert ev["top1"] == result["quant_top1"] and ev["packed"]["reported_top1"] == result["quant_top1"]


def test_vq_human_table_and_kmeans_baseline(stats, tmp_path):
    proc = run_vmq("vq", "--recipe", ROOT / "configs" / "vq-2bit-kmeans.yaml", *FAST, "--stats", stats,
                   "--out", tmp_path / "km.safetensors")
    assert proc.returncode == 0, proc.stderr
    assert "b/w+cb" in proc.stdout and "top-1 quantized" in proc.stdout and "kmeans" in proc.stdout
    assert "│ 0     │ dt_proj_b │" in proc.stdout  # the per-layer table fits 80 columns when piped
    assert all(len(line) <= 80 for line in proc.stdout.splitlines())


def test_vq_with_static_8bit_activations(stats, tmp_path):
    proc = run_vmq("vq", "--recipe", ROOT / "configs" / "vq-2bit-a8.yaml", *FAST, "--stats", stats, "--json",
                   "--out", tmp_path / "a8.safetensors")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert {layer["a_bits"] for layer in result["layers"]} == {8}
    proc = run_vmq("eval", tmp_path / "a8.safetensors", "--limit", "64", "--json")
    assert json.loads(proc.stdout)["top1"] == result["quant_top1"]


@pytest.mark.parametrize("sets,msg", [
    (["vq.codebook.size=24"], "power of two"),
    (["vq.codebook.dim=0"], "greater than or equal to 1"),
    (["vq.codebook.dim=8", "vq.codebook.size=1024"], "exceeds its"),
    (["vq.search.candidates=32"], "exceeds codebook.size"),
    (["vq.targets=[]"], "at least 1 item"),
    (["vq.kmean.iterations=3"], "did you mean 'vq.kmeans"),
    (["vq.input_activations={num_bits: 8, strategy: token_dynamic}"], "static activations"),
    (["vq.search.iterations=5"], "must be at least the number of confirmation stages plus one (6)"),
    (["vq.method=vimvg"], "unknown method 'vimvg'"),
    (["device=cuda:x"], "device must be cpu, cuda or cuda:N"),
])
def test_bad_vq_recipes_fail_in_one_line_without_output(tmp_path, sets, msg):
    out = tmp_path / "x.safetensors"
    args = [a for s in sets for a in ("--set", s)]
    line = one_error_line(run_vmq("vq", *args, "--out", out, "--no-eval", "--set", "calibration.num_images=8"))
    assert msg in line
    assert list(tmp_path.iterdir()) == []


def test_vq_refuses_other_stats_and_nan_weights(stats, tmp_path):
    from safetensors.torch import load_file, save_file

    sd = load_file(str(ROOT / "vmq" / "assets" / "vim_ref_cifar10.safetensors"))
    sd["layers.0.mixer.in_proj.weight"][0, 0] += 0.01
    other = tmp_path / "other.safetensors"
    save_file(sd, str(other))
    line = one_error_line(run_vmq("vq", "--set", f"model.checkpoint={other}", "--stats", stats,
                                  "--out", tmp_path / "q.safetensors"))
    assert "other weights" in line
    sd["layers.5.mixer.out_proj.weight"][1, 1] = float("nan")  # the last block: no later layer sees it
    save_file(sd, str(other))
    line = one_error_line(run_vmq("vq", "--set", f"model.checkpoint={other}", "--out", tmp_path / "q.safetensors",
                                  "--no-eval", *FAST))
    assert "layers.5.mixer.out_proj: the weights hold NaN or Inf" in line
    assert not (tmp_path / "q.safetensors").exists()


@pytest.mark.parametrize("recipe", ["vq-2bit", "vq-2bit-a8"])
def test_vq_same_inputs_same_bytes(stats, tmp_path, recipe):
    outs = []
    for i in range(2):
        out = tmp_path / f"run{i}.safetensors"
        proc = run_vmq("vq", "--recipe", ROOT / "configs" / f"{recipe}.yaml", *FAST, "--stats", stats, "--no-eval",
                       "--out", out)
        assert proc.returncode == 0, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]


@pytest.mark.slow
def test_vq_targets_on_the_reference_model(tmp_path):
    """The README's claims: 3-bit ViM-VQ within 1 point of FP; 2-bit within 3 points and 2 points ahead of k-means."""
    results = {}
    for name in ("vq-3bit", "vq-2bit", "vq-2bit-kmeans"):
        proc = run_vmq("vq", "--recipe", ROOT / "configs" / f"{name}.yaml", "--out", tmp_path / f"{name}.safetensors",
                       "--json")
        assert proc.returncode == 0, proc.stderr
        results[name] = json.loads(proc.stdout)
    fp = results["vq-3bit"]["fp_top1"]
    assert results["vq-3bit"]["quant_top1"] >= fp - 1.0
    assert results["vq-2bit"]["quant_top1"] >= fp - 3.0
    assert results["vq-2bit"]["quant_top1"] >= results["vq-2bit-kmeans"]["quant_top1"] + 2.0
    assert results["vq-2bit"]["logit_snr_db"] > results["vq-2bit-kmeans"]["logit_snr_db"]
