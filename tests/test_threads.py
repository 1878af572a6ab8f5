"""CPU threads: the default from affinity and cgroup quota, --threads on every computing command, OpenMP waiting."""

import json
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from vmq.cpus import (GOMP_SPINCOUNT, available_cpus, cgroup_cpu_quota, default_threads, default_workers,
                      openmp_wait_env)
from vmq.runtime import set_threads
from tests.conftest import run_vmq


def _cgroup(tmp_path, own="/", files=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    proc = tmp_path / "proc_cgroup"
    proc.write_text(f"0::{own}\n")
    for rel, text in (files or {}).items():
        path = tmp_path / "cg" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    (tmp_path / "cg").mkdir(exist_ok=True)
    return tmp_path / "cg", proc


def test_cgroup_v2_quota(tmp_path):
    root, proc = _cgroup(tmp_path, files={"cpu.max": "150000 100000\n"})
    assert cgroup_cpu_quota(root, proc) == 1.5
    assert available_cpus(affinity=8, root=root, proc_cgroup=proc) == 2  # 1.5 CPUs: two threads
    assert available_cpus(affinity=1, root=root, proc_cgroup=proc) == 1  # the affinity mask is smaller


def test_cgroup_v2_no_limit_and_nested_limits(tmp_path):
    root, proc = _cgroup(tmp_path, files={"cpu.max": "max 100000\n"})
    assert cgroup_cpu_quota(root, proc) is None and available_cpus(affinity=6, root=root, proc_cgroup=proc) == 6
    # the process's own cgroup has no limit, its parent allows 3 CPUs
    limits = {"cpu.max": "max 100000", "job/cpu.max": "300000 100000", "job/step/cpu.max": "max 100000"}
    root, proc = _cgroup(tmp_path / "n", own="/job/step", files=limits)
    assert cgroup_cpu_quota(root, proc) == 3.0 and available_cpus(affinity=16, root=root, proc_cgroup=proc) == 3


def test_cgroup_v1_quota(tmp_path):
    root, proc = _cgroup(tmp_path, files={"cpu/cpu.cfs_quota_us": "200000\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(root, proc) == 2.0
    root, proc = _cgroup(tmp_path / "u", files={"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"})
    assert cgroup_cpu_quota(root, proc) is None


def test_garbage_cgroup_files_mean_no_limit(tmp_path):
    root, proc = _cgroup(tmp_path, files={"cpu.max": "lots\n"})
    assert cgroup_cpu_quota(root, proc) is None
    assert cgroup_cpu_quota(tmp_path / "missing", tmp_path / "missing_proc") is None


def test_available_cpus_of_this_process_is_its_affinity_or_less():
    import os

    assert 1 <= available_cpus() <= len(os.sched_getaffinity(0))
    assert available_cpus(affinity=4, quota=0.5) == 1 and available_cpus(affinity=4, quota=2.2) == 3


def test_default_threads():
    assert default_threads({}, cpus=8) == 8
    assert default_threads({"OMP_NUM_THREADS": "3"}, cpus=8) == 3  # the user's (or torchrun's) setting wins
    assert default_threads({"OMP_NUM_THREADS": "junk"}, cpus=8) == 8
    assert default_threads({"LOCAL_WORLD_SIZE": "2"}, cpus=8) == 4  # torchrun: the node's CPUs shared
    assert default_threads({"LOCAL_WORLD_SIZE": "4"}, cpus=2) == 1


def test_default_workers():
    assert [default_workers(c) for c in (1, 2, 3, 4, 16, 64)] == [0, 1, 1, 2, 8, 8]


def test_openmp_wait_env_keeps_what_the_user_set():
    assert openmp_wait_env({})["GOMP_SPINCOUNT"] == GOMP_SPINCOUNT
    assert openmp_wait_env({"OMP_WAIT_POLICY": "active"}) == {}
    assert "GOMP_SPINCOUNT" not in openmp_wait_env({"GOMP_SPINCOUNT": "300000"})


def test_cli_entry_sets_openmp_waiting_before_torch_loads():
    code = ("import os, sys, vmq_cli.main as m\n"
            "try:\n    m.main(['--version'])\nexcept SystemExit:\n    pass\n"
            "print(os.environ.get('GOMP_SPINCOUNT'), 'torch' in sys.modules)")
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env).stdout.split()
    assert out[-2:] == [GOMP_SPINCOUNT, "False"]


def test_set_threads():
    before = torch.get_num_threads()
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert set_threads(None) == default_threads() == torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("command", ["calibrate", "quantize", "vq", "eval", "bench"])
def test_every_computing_command_takes_threads(command):
    from vmq_cli.main import vmq

    r = CliRunner().invoke(vmq, [command, "--help"])
    assert r.exit_code == 0 and "--threads N" in r.output
    r = CliRunner().invoke(vmq, [command, "--threads", "0"])
    assert r.exit_code == 2 and "--threads" in r.output


def test_threads_take_effect_in_the_command():
    before = torch.get_num_threads()
    r = run_vmq("eval", "--model", "test_vim", "--checkpoint", "random", "--limit", "4", "--threads", "1", "--json",
                env={"OMP_NUM_THREADS": "2"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threads"] == 1
    r = run_vmq("bench", "--model", "test_vim", "--batch", "2", "--repeats", "1", "--warmup", "0", "--threads", "1",
                "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["threads"] == 1
    r = run_vmq("eval", "--model", "test_vim", "--checkpoint", "random", "--limit", "4", "--json",
                env={"OMP_NUM_THREADS": "1"})  # no --threads: the environment's
    assert json.loads(r.stdout)["threads"] == 1
    assert torch.get_num_threads() == before
