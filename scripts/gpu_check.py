#!/usr/bin/env python3
"""One prepared GPU check of vmq: build, GPU tests, sanitizers, kernel benchmarks, end to end.

    python3 scripts/gpu_check.py OUTDIR [--dry-run] [--budget SECONDS] [--only STEP,... | --skip STEP,...]
    make gpu-check OUT=OUTDIR

Runs from the repository root on a bare GPU machine with that machine's own python3 and torch
(never installs torch): builds vmq._C in place (CPU + CUDA kernels, sm_90), then runs each step
below under a timeout and writes everything into OUTDIR, in at most 7 files:

    summary.txt  one line per step (status, exit code, seconds), rewritten after every step
    env.txt      machine, toolchain and packages; ptxas registers / spills and SASS counts per .cu
    build.log    the in-place build
    tests.txt    pytest -m gpu over the gpu-marked test files; the kernel tests again on NVRTC
    sanitizer.txt  compute-sanitizer memcheck and racecheck over scripts/gpu_calls.py --small
    bench.txt    benchmarks/kernels.py --gpu-only (CUDA-event timings against labelled baselines)
    e2e.txt      vmq quantize / vmq bench on CUDA (the commands in the block below)

Steps run in order of value, so that a run cut off at its limit still returns the important logs;
the whole run stays inside --budget seconds (default 470: under 8 minutes on one H200), each
step's timeout cut to the time left. --only / --skip pick steps, e.g. for a second call on the same
machine (the end-to-end steps, with the first call's build still in place). Exit code: 0 all
passed, 1 a step failed, 2 none failed but some did not run (no time left, or a step they need
failed). Without a GPU (no nvidia-smi, or torch sees no CUDA device) it prints the plan, exit 0.
Wheels carried in .whl/ (make gpu-wheels: pydantic and its dependencies, which the GPU image
lacks) are installed into a scratch folder on PYTHONPATH; cli/ is linked there as vmq_cli.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

# ==== END-TO-END COMMANDS: the CLI flags this check assumes (fix them here) =======================
# {py}: this Python; {work}: a scratch folder that does not come back. scripts/gpu_e2e_inputs.py
# writes random-weight checkpoints {work}/<model>_random.pth and 256 random 224x224 images in
# ImageNet layout under {work}/images/. Vim-S: PTQ4VM W4A8 with 100 JLSS steps per block; Vim-B:
# W8A8 by RTN (no smoothing, truncation or JLSS: the same integer kernels, for its timings only).
E2E_COMMANDS = [
    ("e2e-inputs", 90, "{py} scripts/gpu_e2e_inputs.py {work} --images 256 --models vim_small vim_base"),
    ("e2e-quantize-vim-s", 240,
     "{py} -m vmq_cli.main quantize --recipe configs/w4a8.yaml --device cuda --set model.name=vim_small "
     "--set model.checkpoint={work}/vim_small_random.pth --set calibration.data={work}/images "
     "--set calibration.num_images=256 --set quantization.jlss.iterations=100 --no-eval "
     "--out {work}/vim_small-w4a8.safetensors"),
    ("e2e-bench-vim-s", 90,
     "{py} -m vmq_cli.main bench {work}/vim_small-w4a8.safetensors --device cuda --batch 1,64 --repeats 20"),
    ("e2e-quantize-vim-b", 120,
     "{py} -m vmq_cli.main quantize --recipe configs/w8a8.yaml --device cuda --set quantization.method=rtn "
     "--set model.name=vim_base --set model.checkpoint={work}/vim_base_random.pth "
     "--set calibration.data={work}/images --set calibration.num_images=256 --no-eval "
     "--out {work}/vim_base-w8a8.safetensors"),
    ("e2e-bench-vim-b", 90,
     "{py} -m vmq_cli.main bench {work}/vim_base-w8a8.safetensors --device cuda --batch 1,64 --repeats 20"),
]
# =================================================================================================

ROOT = Path(__file__).resolve().parents[1]
GPU_MARK = "pytest.mark." + "gpu"  # (split: this file is no gpu-marked test file)
# test_gpu_contract.py last: its last test tries a CUDA graph capture that a kernel may refuse
KERNEL_TESTS = ["tests/test_kernels_gpu.py", "tests/test_scan_train_cuda.py", "tests/test_gpu_contract.py"]
NAMED_GPU_TESTS = KERNEL_TESTS + ["tests/test_device_cuda.py"]
NVCC_FLAGS = ("-O3 -lineinfo --expt-relaxed-constexpr -std=c++17 -arch=sm_90 -D__CUDA_NO_HALF_OPERATORS__ "
              "-D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -I csrc")
SASS_OPS = ("IMMA", "HMMA", "HGMMA", "LDL", "STL", "LDG.E.128", "LDG.E.64", "LDS.128", "CALL.REL", "MUFU.EX2", "BAR")
SANITIZER_UNAVAILABLE = ("Device not supported", "not supported on this platform", "Unable to find injection",
                         "compute-sanitizer: command not found")
# minutes each step is expected to take on one H200 (16 cores), for the plan
EXPECT = {"env": 0.1, "wheels": 0.1, "resources": 0.1, "build": 2.0, "tests": 2.0, "tests-nvrtc": 1.5, "memcheck": 1.0,
          "racecheck": 1.0, "bench": 1.5, "e2e-inputs": 0.3, "e2e-quantize-vim-s": 2.5, "e2e-bench-vim-s": 0.5,
          "e2e-quantize-vim-b": 0.7, "e2e-bench-vim-b": 0.7}


@dataclass
class Step:
    name: str
    log: str
    timeout: int
    what: str
    cmd: Optional[str] = None  # a shell command line ({py}, {work}, {site} filled in); None: run()
    run: Optional[Callable[["Check", "Step", int], int]] = None
    needs: Tuple[str, ...] = ("build",)  # steps that must have passed first
    env: Dict[str, str] = field(default_factory=dict)
    skip: Optional[Callable[["Check"], Optional[str]]] = None  # a reason not to run, or None
    unavailable: Optional[Callable[[int, str], Optional[str]]] = None  # why a failure means "tool unavailable"


def gpu_test_files() -> List[str]:
    """The test files with gpu-marked tests (and the named ones, where present); the contract tests last."""
    found = {str(p.relative_to(ROOT)) for p in sorted((ROOT / "tests").glob("test_*.py"))
             if GPU_MARK in p.read_text(encoding="utf-8")}
    return sorted(found | {f for f in NAMED_GPU_TESTS if (ROOT / f).is_file()}, key=lambda f: (f == KERNEL_TESTS[-1], f))


def sanitizer_unavailable(rc: int, text: str) -> Optional[str]:
    hit = next((s for s in SANITIZER_UNAVAILABLE if s in text), None)
    return f"sanitizer unavailable on this machine ({hit!r})" if hit and rc != 0 else None


def missing_module(module: str, consequence: str) -> Callable[["Check"], Optional[str]]:
    """A skip condition: why not, when ``module`` does not import in the steps' environment."""
    def why(check: "Check") -> Optional[str]:
        r = subprocess.run([check.py, "-c", f"import {module}"], capture_output=True, text=True, env=check.env)
        if r.returncode == 0:
            return None
        return f"{module} does not import ({(r.stderr.strip().splitlines() or ['?'])[-1]}): {consequence}"
    return why


def no_nvrtc(check: "Check") -> Optional[str]:
    """Why the NVRTC pass cannot run: no code reads VMQ_CUDA_KERNELS, or cupy does not import."""
    if not any("VMQ_CUDA_KERNELS" in p.read_text(encoding="utf-8") for p in (ROOT / "vmq").rglob("*.py")):
        return "no NVRTC path in this tree (nothing in vmq/ reads VMQ_CUDA_KERNELS)"
    return missing_module("cupy", "no NVRTC pass")(check)


def resources(check: "Check", step: Step, timeout: int) -> int:
    """ptxas registers / spills / shared memory per kernel and SASS opcode counts per .cu (sm_90)."""
    rc, scratch, procs = 0, Path(tempfile.mkdtemp(prefix="vmq-sass-")), {}
    try:
        with open(check.out / step.log, "a") as log:
            log.write(f"nvcc {NVCC_FLAGS} -Xptxas -v -cubin, each .cu alone\n")
            for src in sorted(glob.glob(str(ROOT / "csrc/cuda/*.cu"))):  # all at once: a few seconds each
                cubin = scratch / (Path(src).stem + ".cubin")
                cmd = ["nvcc", *shlex.split(NVCC_FLAGS), "-Xptxas", "-v", "-cubin", "-o", str(cubin), src]
                procs[src] = (cubin, subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, env=check.env,
                                                      stderr=subprocess.STDOUT, text=True))
            for src, (cubin, p) in procs.items():
                text = p.communicate(timeout=max(10, timeout - 10))[0]
                log.write(f"\n--- {Path(src).name}: kernel, registers, static smem, stack / spill stores / loads\n")
                if p.returncode != 0:
                    rc = 1
                    log.write(text[-3000:])
                    continue
                log.writelines(ptxas_lines(text))
                log.write(sass_counts(cubin, check.env["PATH"]) + "\n")
    finally:
        for _, p in procs.values():
            if p.poll() is None:
                p.kill()
        shutil.rmtree(scratch, ignore_errors=True)
    return rc


def ptxas_lines(text: str) -> List[str]:
    out = []
    for name, body in re.findall(r"Compiling entry function '(\S+)'.*?\n(.*?)(?=Compiling entry|\Z)", text, re.S):
        regs = re.search(r"Used (\d+) registers", body)
        smem = re.search(r"(\d+) bytes smem", body)
        spill = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", body)
        out.append(f"{demangle(name):<64} regs {regs.group(1) if regs else '?':>4}  smem "
                   f"{smem.group(1) if smem else '0':>6}  {'/'.join(spill.groups()) if spill else '?'}\n")
    return out


def sass_counts(cubin: Path, path: str) -> str:
    tool = shutil.which("cuobjdump", path=path)
    if tool is None:
        return "SASS: no cuobjdump"
    sass = subprocess.run([tool, "--dump-sass", str(cubin)], capture_output=True, text=True).stdout
    ops = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    counts = {op: sum(1 for o in ops if o == op or o.startswith(op + ".")) for op in SASS_OPS}
    return f"SASS, {len(ops)} instructions: " + ", ".join(f"{k} {v}" for k, v in counts.items())


def demangle(name: str) -> str:
    try:
        out = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip()
    except OSError:
        return name
    return re.sub(r"vmq::cuda::\(anonymous namespace\)::|vmq::cuda::", "", out or name)


def steps() -> List[Step]:
    tests = " ".join(gpu_test_files())
    kernel_tests = " ".join(f for f in KERNEL_TESTS if (ROOT / f).is_file())
    pytest = "{py} -m pytest -v --tb=short -p no:cacheprovider -rfEs -m gpu {timeout}"  # -v: each result as it comes
    calls = "{py} scripts/gpu_calls.py --small"
    sanitizer = "compute-sanitizer --error-exitcode 9 --report-api-errors no --print-limit 30 {kernels}"
    out = [
        Step("env", "env.txt", 30, "machine, toolchain and packages", needs=(), cmd=(
            "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv; nvcc --version | "
            "tail -2; compute-sanitizer --version | tail -1; uname -r; df -h . | tail -1; {py} -c \"import sys, torch; "
            "print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda, '|', "
            "torch.cuda.get_device_name(0), torch.cuda.get_device_capability(0))\"; {py} -m pip list 2>/dev/null | "
            "grep -i -E '^(triton|cupy|pytest|pytest-timeout|timm|mamba-ssm|pydantic|pydantic.core|typing.extensions) '")),
        Step("wheels", "env.txt", 60, "install the wheels carried in .whl/ into {site} (pydantic for the CLI)",
             needs=(), skip=lambda c: None if glob.glob(str(ROOT / ".whl/*.whl")) else
             "no .whl/ carried (make gpu-wheels): the CLI steps need pydantic",
             cmd="{py} -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target {site} "
                 ".whl/*.whl && {py} -c \"import pydantic; print('pydantic', pydantic.VERSION)\""),
        Step("resources", "env.txt", 60, "ptxas -v (registers, smem, spills) and cuobjdump SASS counts of each "
             "csrc/cuda/*.cu for sm_90", run=resources, needs=()),
        Step("build", "build.log", 300, "build vmq._C in place (CPU + CUDA kernels, sm_90, 16 jobs)",
             needs=(), cmd="{py} setup.py build_ext --inplace && {py} -c \"from vmq.ops import _library as L; "
             "assert L.NATIVE is not None and L.NATIVE.cuda_built, L.NATIVE_ERROR; print('vmq._C:', L.NATIVE.__file__, "
             "'CUDA kernels built')\""),
        Step("tests", "tests.txt", 240, f"GPU tests: {tests}", cmd=f"{pytest} {tests}"),
        Step("tests-nvrtc", "tests.txt", 150, f"the kernel tests again on the NVRTC kernels: {kernel_tests}",
             cmd=f"{pytest} {kernel_tests}", env={"VMQ_CUDA_KERNELS": "nvrtc"}, skip=no_nvrtc),
        Step("memcheck", "sanitizer.txt", 150, "compute-sanitizer memcheck: each kernel variant once on tail shapes "
             "(no caching allocator: every tensor its own allocation)", cmd=f"{sanitizer} --tool memcheck {calls}",
             env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}, unavailable=sanitizer_unavailable),
        Step("racecheck", "sanitizer.txt", 150, "compute-sanitizer racecheck (shared-memory hazards), same calls",
             cmd=f"{sanitizer} --tool racecheck {calls}", unavailable=sanitizer_unavailable),
        Step("bench", "bench.txt", 180, "kernel benchmarks: CUDA-event medians against labelled baselines, "
             "batch 1 and 64", cmd="{py} benchmarks/kernels.py --gpu-only"),
    ]
    no_pydantic = missing_module("pydantic", "the CLI needs it; carry .whl/ (make gpu-wheels)")
    for name, timeout, cmd in E2E_COMMANDS:  # each needs the one before it that makes its input
        needs = ("e2e-inputs",) if "quantize" in name else ("e2e-quantize" + name[len("e2e-bench"):],) \
            if "bench" in name else ("build",)
        out.append(Step(name, "e2e.txt", timeout, "end to end (flags: the block at the top of this script)", cmd=cmd,
                        needs=needs, skip=no_pydantic))
    return out


class Check:
    def __init__(self, out: Path, budget: float):
        self.out, self.deadline = out, time.monotonic() + budget
        self.py = sys.executable
        self.site = Path(tempfile.gettempdir()) / "vmq-gpu-site"
        self.work = Path(tempfile.gettempdir()) / "vmq-gpu-e2e"
        self.results: List[tuple] = []  # (step, status, rc, seconds, note)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", VMQ_BUILD_CUDA="1", TORCH_CUDA_ARCH_LIST="9.0", MAX_JOBS="16",
                        VMQ_REQUIRE_NATIVE="1", PYTHONPATH=os.pathsep.join(
                            [str(ROOT), str(self.site)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
                        PATH=os.environ.get("PATH", "") + os.pathsep + "/usr/local/cuda/bin")
        self.fields = {}
        self.assumed = set()  # steps left out of this run, whose results later steps take as given

    def setup(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        for name in ("summary.txt", "env.txt", "build.log", "tests.txt", "sanitizer.txt", "bench.txt", "e2e.txt"):
            (self.out / name).unlink(missing_ok=True)
        self.site.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        link = self.site / "vmq_cli"  # the CLI importable without installing vmq
        if not link.is_symlink():
            link.symlink_to(ROOT / "cli", target_is_directory=True)
        has_timeout = subprocess.run([self.py, "-c", "import pytest_timeout"], capture_output=True).returncode == 0
        help_text = subprocess.run("compute-sanitizer --help", shell=True, capture_output=True, text=True).stdout
        self.fields = dict(py=shlex.quote(self.py), work=self.work, site=self.site,
                           timeout="--timeout 150" if has_timeout else "",
                           # vmq's kernels only (their names hold the namespace), where the filter exists
                           kernels="--kernel-name kns=vmq" if "--kernel-name" in help_text else "")

    def status_of(self, name: str) -> Optional[str]:
        return next((r[1] for r in self.results if r[0] == name), None)

    def record(self, step: Step, status: str, rc: Optional[int], seconds: float, note: str = "") -> None:
        self.results.append((step.name, status, rc, seconds, note))
        lines = [f"{n:<20} {s:<12} rc={'-' if r is None else r:<4} {t:6.1f} s  {m}" for n, s, r, t, m in self.results]
        (self.out / "summary.txt").write_text("\n".join(lines) + "\n")
        print(f"=== {time.strftime('%H:%M:%S')} {step.name}: {status} (rc {rc}, {seconds:.1f} s) {note}", flush=True)

    def run_step(self, step: Step) -> None:
        left = self.deadline - time.monotonic()
        unmet = [n for n in step.needs if self.status_of(n) != "passed" and n not in self.assumed]
        if unmet:
            return self.record(step, "not run", None, 0.0, f"needs {', '.join(unmet)}, which did not pass")
        if left < 20:
            return self.record(step, "not run", None, 0.0, "no time left in the budget")
        reason = step.skip(self) if step.skip else None
        if reason:
            return self.record(step, "skipped", None, 0.0, reason)
        timeout = int(min(step.timeout, left - 5))
        log_path = self.out / step.log
        start, offset = time.monotonic(), log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "a") as log:
            log.write(f"\n===== {time.strftime('%H:%M:%S')} step {step.name}: {step.what} (timeout {timeout} s)\n")
            if step.cmd:
                cmd = step.cmd.format(**self.fields)
                log.write(f"$ {''.join(f'{k}={v} ' for k, v in step.env.items())}{cmd}\n")
                log.flush()
                rc = self.shell(cmd, log, timeout, step.env)
            else:
                log.flush()
                try:
                    rc = step.run(self, step, timeout)
                except Exception as exc:  # noqa: BLE001  (a broken step is reported; the others still run)
                    log.write(f"{type(exc).__name__}: {exc}\n")
                    rc = 1
        seconds = time.monotonic() - start
        with open(log_path, "a") as log:
            log.write(f"===== step {step.name}: rc={rc} in {seconds:.1f} s\n")
        with open(log_path, errors="replace") as log:
            log.seek(offset)
            text = log.read()
        why = step.unavailable(rc, text) if step.unavailable else None
        status = "passed" if rc == 0 else "unavailable" if why else "TIMEOUT" if rc == 124 else "FAILED"
        self.record(step, status, rc, seconds, why or "")
        if status in ("FAILED", "TIMEOUT"):
            print("\n".join(text.splitlines()[-25:]), flush=True)

    def shell(self, cmd: str, log, timeout: int, env: Dict[str, str]) -> int:
        p = subprocess.Popen(cmd, shell=True, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             env=dict(self.env, **env), start_new_session=True, executable="/bin/bash")
        try:
            return p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):  # the step's own process group only
                try:
                    os.killpg(p.pid, sig)
                    p.wait(timeout=10)
                    break
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    continue
            log.write(f"\n[timed out after {timeout} s]\n")
            return 124


def gpu_present(py: str) -> Optional[str]:
    """None when a CUDA device is usable from ``py``'s torch, else why not."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi"
    if subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode != 0:
        return "nvidia-smi finds no GPU"
    probe = "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)"
    r = subprocess.run([py, "-c", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return "torch sees no CUDA device" if r.returncode == 3 else "torch does not import"
    return None


def plan(out: Path, budget: float, why: str, chosen: List[Step]) -> None:
    print(f"gpu-check plan (dry run: {why}); output folder {out}, budget {budget:.0f} s, run from {ROOT}")
    print("setup: PYTHONPATH=<repo>:<site>, <site>/vmq_cli -> cli/; VMQ_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 "
          "MAX_JOBS=16 VMQ_REQUIRE_NATIVE=1")
    for i, s in enumerate(chosen, 1):
        what = s.what.replace("{site}", "<site>")
        cmd = s.cmd or f"(in this script: {s.run.__name__})"
        cmd = cmd.replace("{timeout}", "[--timeout 150]").replace("{kernels}", "[--kernel-name kns=vmq]")
        env = " ".join(f"{k}={v}" for k, v in s.env.items())
        needs = f", after {', '.join(s.needs)}" if s.needs else ""
        print(f"{i:2}. {s.name} -> {s.log} (~{EXPECT.get(s.name, 1):g} min, timeout {s.timeout} s{needs}): {what}\n"
              f"    $ {env + ' ' if env else ''}"
              f"{cmd.format(py='python3', work='<work>', site='<site>')}")
    print(f"expected ~{sum(EXPECT.get(s.name, 1) for s in chosen):.0f} min in all; the budget cuts the last steps "
          "(not run, exit code 2) when earlier ones take longer")
    print("exit code: 0 all passed, 1 a step failed, 2 some steps did not run")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="output folder (at most 7 files)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan only")
    ap.add_argument("--budget", type=float, default=470.0, help="seconds for the whole run (default 470)")
    ap.add_argument("--only", default="", metavar="STEP,...",
                    help="run these steps only (a step they need that is left out counts as passed: e.g. a second "
                         "call on the same machine, where the build from the first is still in place)")
    ap.add_argument("--skip", default="", metavar="STEP,...", help="leave these steps out")
    args = ap.parse_args()
    names = [s.name for s in steps()]
    only, skip = [n for n in args.only.split(",") if n], [n for n in args.skip.split(",") if n]
    unknown = [n for n in only + skip if n not in names]
    if unknown:
        ap.error(f"unknown step {unknown[0]!r}; the steps: {', '.join(names)}")
    if only:
        only.append("wheels")  # cheap, and what the CLI steps need on a machine whose scratch folder is gone
    chosen = [s for s in steps() if (not only or s.name in only) and s.name not in skip]
    why = "--dry-run" if args.dry_run else gpu_present(sys.executable)
    if why:
        plan(args.out, args.budget, why, chosen)
        return 0
    check = Check(args.out.resolve(), args.budget)
    os.chdir(ROOT)
    check.setup()
    check.assumed = {n for n in names if n not in {s.name for s in chosen}}
    for step in chosen:
        check.run_step(step)
    by_status = {s: [r[0] for r in check.results if r[1] == s] for s in ("FAILED", "TIMEOUT", "not run", "skipped",
                                                                           "unavailable")}
    bad = by_status["FAILED"] + by_status["TIMEOUT"]
    verdict = (f"FAILED: {', '.join(bad)}" if bad else
               f"incomplete: not run: {', '.join(by_status['not run'])}" if by_status["not run"] else "all steps passed")
    verdict += "".join(f"; {s}: {', '.join(v)}" for s, v in by_status.items() if v and s in ("skipped", "unavailable"))
    with open(check.out / "summary.txt", "a") as f:
        f.write(f"gpu-check: {verdict}\n")
    print(f"gpu-check: {verdict}")
    return 1 if bad else 2 if by_status["not run"] else 0


if __name__ == "__main__":
    sys.exit(main())
