"""The command line: outputs, exit codes, one-line errors, lazy start-up."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_vmq


def test_help_imports_no_torch():
    code = ("import sys, vmq_cli.main as m\n"
            "sys.argv = ['vmq', '--help']\n"
            "try:\n    m.main()\nexcept SystemExit:\n    pass\n"
            "bad = [k for k in sys.modules if k.split('.')[0] in ('torch', 'cupy', 'mamba_ssm', 'timm')]\n"
            "print('IMPORTED', bad)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    assert "IMPORTED []" in out, out
    assert "eval" in out and "env" in out


def test_unknown_command_is_usage_error():
    _one_line_error(run_vmq("evl"), code=2, match="did you mean 'eval'")


def test_eval_json_on_fixture(fixtures_dir):
    r = run_vmq("eval", "--model", "test_vim", "--checkpoint", fixtures_dir / "vim_micro" / "state_dict.safetensors",
                "--limit", "40", "--batch-size", "16", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)  # stdout holds only the JSON document
    for key in ("model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                "interpolation", "num_images", "images_per_sec"):
        assert key in res
    assert res["num_images"] == 40 and res["model"] == "test_vim" and res["param_count"] == pytest.approx(0.0618, abs=1e-4)
    assert res["top1"] + res["top1_err"] == pytest.approx(100)


def test_eval_table(fixtures_dir):
    r = run_vmq("eval", "--checkpoint", fixtures_dir / "vim_micro" / "state_dict.safetensors", "--limit", "8")
    assert r.returncode == 0, r.stderr
    assert "top-1" in r.stdout and "test_vim" in r.stdout  # model found from the checkpoint's keys


def test_env_json():
    r = run_vmq("env", "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["versions"]["torch"].startswith("2.14.1")
    assert "available" in info["cuda"] and "features" in info["cpu"]


def _one_line_error(r, code=1, match=None):
    assert r.returncode == code, (r.returncode, r.stderr)
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1, r.stderr
    assert "Traceback" not in r.stderr
    if match:
        assert match in lines[0], lines[0]
    assert r.stdout == ""


def test_errors(tmp_path, fixtures_dir):
    micro = fixtures_dir / "vim_micro" / "state_dict.safetensors"
    _one_line_error(run_vmq("eval", "--checkpoint", tmp_path / "missing.pth"), match="checkpoint not found")
    corrupt = tmp_path / "corrupt.pth"
    corrupt.write_bytes(b"PK\x03\x04 this is not a zip")
    _one_line_error(run_vmq("eval", "--checkpoint", corrupt), match="truncated or corrupt")
    _one_line_error(run_vmq("eval", "--model", "vim_tiny", "--checkpoint", micro), match="it fits test_vim")
    _one_line_error(run_vmq("eval", "--model", "vim_tinyy"), match="unknown model")
    _one_line_error(run_vmq("eval", "--model", "vim_small"), match="needs --checkpoint")
    empty = tmp_path / "empty"
    empty.mkdir()
    _one_line_error(run_vmq("eval", "--checkpoint", micro, "--data", empty), match="is empty")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(flat / "x.png")
    _one_line_error(run_vmq("eval", "--checkpoint", micro, "--data", flat), match="no class subfolders")
    if not torch.cuda.is_available():
        _one_line_error(run_vmq("eval", "--checkpoint", micro, "--device", "cuda"), match="no CUDA device")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0"])
@pytest.mark.parametrize("command", ["quantize", "vq", "calibrate"])
def test_device_cuda_without_cuda(tmp_path, command, device):
    out = tmp_path / "out.safetensors"
    r = run_vmq(command, "--device", device, "--out", out)
    _one_line_error(r, code=1, match=f"error: --device {device}: no CUDA device is available")
    assert list(tmp_path.iterdir()) == []  # no output, no recipe, no temporary file


@pytest.mark.parametrize("command", ["quantize", "vq", "calibrate"])
def test_device_that_is_no_device(tmp_path, command):
    r = run_vmq(command, "--device", "gpu", "--out", tmp_path / "out.safetensors")
    assert r.returncode in (1, 2), r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and "gpu" in lines[0] and "internal error" not in lines[0], r.stderr
    assert r.stdout == "" and list(tmp_path.iterdir()) == []


def test_usage_errors_exit_2():
    _one_line_error(run_vmq("eval", "--batch-size", "0"), code=2, match="batch-size")
    _one_line_error(run_vmq("eval", "--no-such-option"), code=2, match="no-such-option")


def test_debug_shows_traceback(tmp_path):
    r = run_vmq("eval", "--checkpoint", tmp_path / "missing.pth", env={"VMQ_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_progress_off_a_terminal_prints_plain_lines(capsys):
    from vmq_cli import _console

    with _console.progress("quantizing blocks", 3, every_s=0.0) as update:
        for i in range(1, 4):
            update(i)
    with _console.progress("quick", 3) as update:  # under every_s: nothing
        update(3)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert [ln.split(" (")[0] for ln in lines] == [f"quantizing blocks: {i}/3" for i in range(1, 4)]
