"""The prepared GPU check (scripts/gpu_check.py, ``make gpu-check``): its dry run, as CI runs it."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"


def _module():
    if "gpu_check" not in sys.modules:  # (dataclasses look their module up there)
        spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
        sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["gpu_check"])
    return sys.modules["gpu_check"]


def _dry_run(*args, env=None):
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, **(env or {})), timeout=120)


def test_dry_run_names_every_step_and_writes_nothing(tmp_path):
    check = _module()
    steps = check.steps()
    names = [s.name for s in steps]
    assert names[:5] == ["env", "wheels", "resources", "build", "tests"]  # most valuable first
    for want in ("tests-nvrtc", "memcheck", "racecheck", "bench", "e2e-quantize-vim-s", "e2e-bench-vim-b"):
        assert want in names
    assert len({s.log for s in steps} | {"summary.txt"}) <= 7  # what comes back from the machine: 8 files at most
    out = tmp_path / "gpu"
    r = _dry_run(str(out), "--dry-run")
    assert r.returncode == 0, r.stderr
    for i, step in enumerate(steps, 1):
        assert f"{i:2}. {step.name} -> {step.log}" in r.stdout
    for text in ("setup.py build_ext --inplace", "-m gpu", "VMQ_CUDA_KERNELS=nvrtc", "--tool memcheck",
                 "--tool racecheck", "gpu_calls.py --small", "benchmarks/kernels.py --gpu-only", "vmq_cli.main quantize",
                 "--device cuda", "tests/test_kernels_gpu.py", "tests/test_gpu_contract.py"):
        assert text in r.stdout, text
    assert not out.exists()


def test_without_a_gpu_it_prints_the_plan_and_exits_0(tmp_path):
    # no visible device: torch (where installed) sees none, so the check falls back to its plan
    r = _dry_run(str(tmp_path / "gpu"), env={"CUDA_VISIBLE_DEVICES": ""})
    assert r.returncode == 0, r.stderr
    assert "gpu-check plan (dry run:" in r.stdout and "e2e-bench-vim-b" in r.stdout
    assert not (tmp_path / "gpu").exists()


def test_gpu_marked_test_files_are_found():
    check = _module()
    files = check.gpu_test_files()
    assert "tests/test_kernels_gpu.py" in files and "tests/test_gpu_contract.py" in files
    assert "tests/test_gpu_check.py" not in files and "tests/test_kernels.py" not in files


def test_sanitizer_refusal_is_unavailable_not_a_failure():
    check = _module()
    assert check.sanitizer_unavailable(1, "========= Error: Device not supported\n") is not None
    assert check.sanitizer_unavailable(9, "========= ERROR SUMMARY: 2 errors\n") is None
    assert check.sanitizer_unavailable(0, "Device not supported") is None


def test_ptxas_report_parses_registers_and_spills():
    check = _module()
    text = ("ptxas info    : Compiling entry function '_Z6kernelPf' for 'sm_90'\n"
            "ptxas info    : Function properties for _Z6kernelPf\n"
            "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
            "ptxas info    : Used 40 registers, used 1 barriers, 1536 bytes smem\n")
    (line,) = check.ptxas_lines(text)
    assert "regs   40" in line and "smem   1536" in line and "8/8/4" in line
