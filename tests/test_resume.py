"""Resumable runs: `vmq calibrate`, `vmq quantize` and `vmq vq` killed (SIGKILL) after two blocks and
rerun with --resume finish with the same bytes as an uninterrupted run; progress made with another
recipe, model or calibration set is refused by name; the progress folder itself (vmq.progress)."""

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, noise_image_folder, one_error_line, run_vmq
from vmq.errors import VmqError
from vmq.progress import ProgressStore, progress_path_for

# the driver a killed run goes through: the real CLI, SIGKILLed by itself right after the progress
# of its second block is on disk (a test-only wrapper: vmq itself has no kill switch)
KILLED_AFTER = 2
DRIVER = f"""
import os, signal, sys
from vmq.progress import ProgressStore
save = ProgressStore.save_block
def save_then_die(self, index, tensors, meta):
    save(self, index, tensors, meta)
    if index + 1 == {KILLED_AFTER}:
        os.kill(os.getpid(), signal.SIGKILL)
ProgressStore.save_block = save_then_die
import vmq_cli.main
vmq_cli.main.main(sys.argv[1:])
"""

PTQ = ["quantize", "--recipe", ROOT / "configs" / "w4a8.yaml", "--set", "calibration.num_images=32",
       "--set", "quantization.jlss.iterations=3", "--set", "quantization.truncation.num_images=16", "--no-eval"]
VQ = ["vq", "--recipe", ROOT / "configs" / "vq-2bit.yaml", "--set", "calibration.num_images=32",
      "--set", "vq.search.iterations=10", "--set", "vq.kmeans.iterations=5", "--no-eval"]
CALIBRATE = ["calibrate", "--num-images", "32"]
COMMANDS = {"quantize": PTQ, "vq": VQ, "calibrate": CALIBRATE}


def run_killed(*args):
    env = dict(os.environ)
    env.pop("VMQ_DEBUG", None)
    proc = subprocess.run([sys.executable, "-c", DRIVER, *map(str, args)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return proc


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".progress"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Each command's output written in one go."""
    outs = {}
    for name, args in COMMANDS.items():
        out = tmp_path_factory.mktemp(f"whole-{name}") / "out.safetensors"
        proc = run_vmq(*args, "--out", out)
        assert proc.returncode == 0, proc.stderr
        assert leftovers(out.parent) == []  # the progress folder is gone once the output is written
        outs[name] = out
    return outs


@pytest.fixture(scope="module")
def killed_ptq(tmp_path_factory):
    """The progress folder of a `vmq quantize` killed after two blocks (copied by the refusal tests)."""
    out = tmp_path_factory.mktemp("killed-ptq") / "out.safetensors"
    run_killed(*PTQ, "--out", out)
    return progress_path_for(out)


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_killed_then_resumed_gives_the_same_bytes(command, uninterrupted, tmp_path):
    out = tmp_path / "out.safetensors"
    run_killed(*COMMANDS[command], "--out", out)
    progress = progress_path_for(out)
    assert not out.exists() and ProgressStore.count_done(progress) == KILLED_AFTER
    proc = run_vmq(*COMMANDS[command], "--out", out, "--resume", "--json")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == uninterrupted[command].read_bytes()
    if command != "calibrate":
        recipe = out.with_name("out.recipe.yaml")
        assert recipe.read_bytes() == uninterrupted[command].with_name("out.recipe.yaml").read_bytes()
        assert len(json.loads(proc.stdout)["layers"]) == 36  # the reports of the recorded blocks came back
    assert leftovers(tmp_path) == []


def test_resume_without_progress_starts_over(uninterrupted, tmp_path):
    out = tmp_path / "out.safetensors"
    proc = run_vmq(*CALIBRATE, "--out", out, "--resume")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == uninterrupted["calibrate"].read_bytes() and leftovers(tmp_path) == []


def with_progress(killed, tmp_path):
    out = tmp_path / "out.safetensors"
    shutil.copytree(killed, progress_path_for(out))
    return out


@pytest.fixture(scope="module")
def other_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    noise_image_folder(root / "train", ("airplane", "cat"), 16, 32)
    return root


def test_existing_progress_without_resume_is_refused(killed_ptq, tmp_path):
    out = with_progress(killed_ptq, tmp_path)
    line = one_error_line(run_vmq(*PTQ, "--out", out))
    assert f"{progress_path_for(out)} holds the progress of an interrupted run (blocks done: 2)" in line
    assert "--resume" in line and not out.exists()
    assert ProgressStore.count_done(progress_path_for(out)) == 2  # nothing was discarded


@pytest.mark.parametrize("change, expected", [
    (["--set", "quantization.jlss.iterations=4"],
     "with a different recipe (quantization.jlss.iterations: 3 there, 4 now)"),
    (["--set", "seed=1"], "with a different recipe (seed: 0 there, 1 now)"),
    (["--set", "quantization.scheme=W8A8"], "with a different recipe (quantization.scheme.weights.num_bits: 4 there, "
                                            "8 now)"),
    (["--set", "model.name=vim_ref_cifar10", "--set", "model.checkpoint=random"],
     "with a different model (weights sha256"),
    (["--recipe", ROOT / "configs" / "vq-2bit.yaml"], "by `vmq quantize`, not `vmq vq`"),
])
def test_resume_against_other_work_is_refused(killed_ptq, tmp_path, change, expected):
    out = with_progress(killed_ptq, tmp_path)
    args = VQ if change[0] == "--recipe" else [*PTQ, *change]
    line = one_error_line(run_vmq(*args, "--out", out, "--resume"))
    assert f"the progress in {progress_path_for(out)} was made {expected}" in line, line
    assert line.endswith("remove it to start over") and not out.exists()


def test_resume_on_another_calibration_set_is_refused(killed_ptq, tmp_path, other_images):
    out = with_progress(killed_ptq, tmp_path)
    line = one_error_line(run_vmq(*PTQ, "--set", f"calibration.data={other_images}", "--out", out, "--resume"))
    assert "was made with a different calibration set (images sha256" in line


def test_calibrate_resume_against_other_settings_is_refused(tmp_path):
    out = tmp_path / "stats.safetensors"
    run_killed(*CALIBRATE, "--out", out)
    progress = progress_path_for(out)
    for args, expected in ((["--num-images", "16"], "different settings (num_images: 32 there, 16 now)"),
                           (["--num-images", "32", "--batch-size", "8"], "different settings (batch_size: 32 there, "
                                                                        "8 now)"),
                           (["--num-images", "32", "--model", "vim_ref_cifar10", "--checkpoint", "random"],
                            "a different model (weights sha256")):
        line = one_error_line(run_vmq("calibrate", *args, "--out", out, "--resume"))
        assert f"the progress in {progress} was made with {expected}" in line, line
    assert ProgressStore.count_done(progress) == KILLED_AFTER


# -- the progress folder ------------------------------------------------------------------------
IDENTITY = {"command": "calibrate", "settings": {"num_images": 8, "batch_size": 4}, "model_sha256": "a" * 64,
            "images_sha256": "b" * 64, "blocks": 3}


def test_store_records_blocks_atomically_and_in_order(tmp_path):
    folder = tmp_path / "x.progress"
    store = ProgressStore.open(folder, IDENTITY, resume=False)
    assert store.done == 0 and not folder.exists()  # made with the first finished block
    store.save_block(0, {"t": torch.arange(4.0)}, {"names": ["t"], "inf": float("inf")})
    assert sorted(p.name for p in folder.iterdir()) == ["block-0000.safetensors", "run.json"]
    with pytest.raises(ValueError):
        store.save_block(2, {}, {})  # blocks are recorded in order
    again = ProgressStore.open(folder, dict(IDENTITY), resume=True)
    assert again.done == 1
    tensors, meta = again.load_block(0)
    assert torch.equal(tensors["t"], torch.arange(4.0)) and meta == {"names": ["t"], "inf": float("inf")}
    (folder / "block-0002.safetensors").write_bytes(b"")  # after a gap: not counted
    assert ProgressStore.count_done(folder) == 1
    again.remove()
    assert not folder.exists()


def test_store_refusals(tmp_path):
    folder = tmp_path / "x.progress"
    ProgressStore.open(folder, IDENTITY, resume=False).save_block(0, {}, {})
    with pytest.raises(VmqError, match=r"holds the progress of an interrupted run \(blocks done: 1\); rerun with "
                                       "--resume"):
        ProgressStore.open(folder, IDENTITY, resume=False)
    other = dict(IDENTITY, settings={"num_images": 8, "batch_size": 2})
    with pytest.raises(VmqError, match=r"different settings \(batch_size: 4 there, 2 now\); remove it"):
        ProgressStore.open(folder, other, resume=True)
    with pytest.raises(VmqError, match=r"calibration set \(images sha256 b{12}\.\.\. there, c{12}\.\.\. now\)"):
        ProgressStore.open(folder, dict(IDENTITY, images_sha256="c" * 64), resume=True)
    foreign = tmp_path / "mine.progress"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(VmqError, match="is not a vmq progress folder"):
        ProgressStore.open(foreign, IDENTITY, resume=True)
    ProgressStore(foreign, IDENTITY, 0).remove()  # removes vmq's files only
    assert (foreign / "notes.txt").read_text() == "keep"


# -- from Python ----------------------------------------------------------------------------------
class Interrupted(Exception):
    pass


def test_library_resume_in_process(tmp_path, monkeypatch):
    """vmq.compress(progress_dir=..., resume=True) on a tiny model: smoothing folded into the norms
    (outside the targets) comes back with the recorded blocks, and the packed bytes match."""
    import copy

    import timm

    import vmq
    from vmq.calib import collect_stats

    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    model.vmq_name = "test_vim"
    images = torch.randn(16, 3, 32, 32)
    stats = collect_stats(model, images, 8)
    recipe = {"quantization": {"method": "smoothquant", "scheme": "W8A8"}, "calibration": {"batch_size": 8}}
    whole = vmq.compress(recipe, model=copy.deepcopy(model), images=images, stats=stats, evaluate_model=False)
    whole.save(tmp_path / "whole.safetensors")

    progress = tmp_path / "part.safetensors.progress"
    save = ProgressStore.save_block

    def save_then_stop(self, index, tensors, meta):
        save(self, index, tensors, meta)
        raise Interrupted

    monkeypatch.setattr(ProgressStore, "save_block", save_then_stop)
    with pytest.raises(Interrupted):
        vmq.compress(recipe, model=copy.deepcopy(model), images=images, stats=stats, evaluate_model=False,
                     progress_dir=progress)
    monkeypatch.undo()
    assert ProgressStore.count_done(progress) == 1
    other = collect_stats(model, images[:8], 8)
    with pytest.raises(VmqError, match=r"made with other calibration statistics \(--stats; sha256"):
        vmq.compress(recipe, model=copy.deepcopy(model), images=images, stats=other, evaluate_model=False,
                     progress_dir=progress, resume=True)
    part = vmq.compress(recipe, model=copy.deepcopy(model), images=images, stats=stats, evaluate_model=False,
                        progress_dir=progress, resume=True)
    assert [r.to_dict() for r in part.reports] == [r.to_dict() for r in whole.reports]
    assert any(r.smoothing.startswith("folded into") for r in part.reports[:6])  # in the recorded block
    part.save(tmp_path / "part.safetensors")
    assert not progress.exists()
    assert (tmp_path / "part.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
