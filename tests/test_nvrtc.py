"""vmq.ops.nvrtc without a GPU: every csrc/cuda/*.cu builds under NVRTC, the ctypes mirrors have the
C++ layouts, the Python bindings plan the launches of the C++ launchers, the kernel sources ship
in the package, and the path of the CUDA kernels is chosen and reported as documented.

The NVRTC builds need CuPy (``pip install vmq[cupy]``) and no GPU; the layout test needs g++ and
the CUDA headers. The GPU side is tests/test_nvrtc_gpu.py.
"""

import contextlib
import importlib.util
import inspect
import os
import re
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

from tests.test_kernels import _linear_inputs, _mixed_kind_calls, _multi_scan_inputs, _scan_inputs, _vq_inputs
from vmq.env import kernels
from vmq.errors import VmqError
from vmq.ops import _library, nvrtc
from vmq.ops.backend import BUILD_FIX, CAPABILITIES, use_native
from vmq.ops.linear import pack_int4
from vmq.ops.nvrtc import build, common, gemm, scan, scan_train, structs

ROOT = Path(__file__).resolve().parents[1]
needs_cupy = pytest.mark.skipif(importlib.util.find_spec("cupy") is None,
                                reason="CuPy is not installed (pip install vmq[cupy]): NVRTC builds not checked")


@needs_cupy
def test_every_cuda_source_builds_under_nvrtc():
    """Each .cu with the name expressions of every kernel vmq launches from it (and the appended
    checks of their parameters, struct sizes and constants), for compute_90: no GPU needed."""
    sources = build.sources()
    assert {k.source for k in nvrtc.KERNELS} <= {s.name for s in sources}
    times = {}
    for src in sources:
        kernels_of = tuple(k for k in nvrtc.KERNELS if k.source == src.name)
        start = time.perf_counter()
        program = build.compile_program(src.name, kernels_of, "compute_90")
        times[src.name] = time.perf_counter() - start
        assert program.image.startswith(b"//") or b".version" in program.image[:2000]  # PTX text
        assert [name for name, _ in program.lowered] == [k.name for k in kernels_of]
        for name, lowered in program.lowered:
            assert lowered.startswith("_Z"), (name, lowered)
    print("NVRTC builds (s):", ", ".join(f"{n} {t:.2f}" for n, t in times.items()))


@needs_cupy
def test_a_changed_kernel_fails_the_nvrtc_build():
    k = gemm.KERNELS[-1]  # kmeans_assign_kernel<32>: a small source
    with pytest.raises(RuntimeError, match="its parameters are not"):
        build.compile_program(k.source, (k._replace(params="const float*, int"),), "compute_90")
    stale = 'static_assert(sizeof(vmq::cuda::GemmArgs) == 8, "GemmArgs");'
    with pytest.raises(RuntimeError, match="GemmArgs"):
        build.compile_program(k.source, (k._replace(checks=(stale,)),), "compute_90")


def test_struct_mirrors_match_the_cxx_layout(tmp_path):
    """sizeof / offsetof of every launchers.h struct, as g++ lays it out, against the ctypes mirrors."""
    gxx = shutil.which("g++")
    nvcc = shutil.which("nvcc")
    # the toolkit's include dir, as setup.py finds it (CUDA_HOME, nvcc's), or the wheels' headers
    # where they are complete (host compilers need crt/host_config.h)
    candidates = [os.path.join(os.environ["CUDA_HOME"], "include")] if os.environ.get("CUDA_HOME") else []
    candidates += [os.path.join(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))), "include")] if nvcc else []
    candidates += ["/usr/local/cuda/include", build.cuda_include_dir() or ""]
    include = next((c for c in candidates if c and (Path(c) / "crt" / "host_config.h").is_file()), None)
    if gxx is None or include is None:
        pytest.skip("needs g++ and the CUDA toolkit headers (cuda_runtime.h with crt/host_config.h)")
    lines = []
    for cls in structs.LAUNCHERS_H:
        name = structs.CXX_NAMES[cls]
        lines.append(f'std::printf("{cls.__name__} sizeof %zu\\n", sizeof({name}));')
        lines += [f'std::printf("{cls.__name__} {f} %zu\\n", offsetof({name}, {f}));' for f, _ in cls._fields_]
    for enum, values in (("ScanType", structs.SCAN_TYPE), ("ScanMerge", structs.SCAN_MERGE)):
        lines += [f'std::printf("{enum} {v} %d\\n", static_cast<int>(vmq::cuda::{enum}::{v}));' for v in values]
    consts = {"kScanMaxState": scan.SCAN_MAX_STATE, "kKmeansMaxDim": gemm.KMEANS_MAX_DIM,
              "kScanTrainChunk": scan_train.CHUNK, "kScanTrainMaxState": scan_train.MAX_STATE}
    lines += [f'std::printf("const {c} %d\\n", vmq::cuda::{c});' for c in consts]
    (tmp_path / "layout.cpp").write_text("#include <cstddef>\n#include <cstdio>\n#include \"cuda/launchers.h\"\n"
                                         "int main() {\n" + "\n".join(lines) + "\nreturn 0;\n}\n")
    exe = tmp_path / "layout"
    subprocess.run([gxx, "-std=c++17", "-I", str(ROOT / "csrc"), "-I", include, str(tmp_path / "layout.cpp"), "-o",
                    str(exe)], check=True, capture_output=True, text=True, timeout=300)
    got = {tuple(line.split()[:2]): int(line.split()[2])
           for line in subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.splitlines()}
    want = {(cls.__name__, f): v for cls in structs.LAUNCHERS_H for f, v in structs.layout(cls)}
    want.update({("ScanType", k): v for k, v in structs.SCAN_TYPE.items()})
    want.update({("ScanMerge", k): v for k, v in structs.SCAN_MERGE.items()})
    want.update({("const", c): v for c, v in consts.items()})
    assert got == want


def test_kernel_sources_ship_in_the_package(tmp_path):
    """setup.py's build_py copies the torch-free CUDA sources into vmq/_csrc/cuda, where an installed
    vmq finds them."""
    lib = tmp_path / "lib"
    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(lib)], cwd=ROOT, check=True,
                   capture_output=True, env={**_env(), "VMQ_NO_EXTENSION": "1"}, timeout=300)
    shipped = lib / "vmq" / "_csrc" / "cuda"
    want = sorted(p.name for p in (ROOT / "csrc" / "cuda").iterdir()
                  if p.suffix in (".cu", ".cuh", ".h") and p.name != "binding.h")
    assert sorted(p.name for p in shipped.iterdir()) == want
    for name in want:
        assert (shipped / name).read_bytes() == (ROOT / "csrc" / "cuda" / name).read_bytes(), name
    code = "from vmq.ops.nvrtc import build; print(build.source_root())"
    found = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                           env={**_env(), "PYTHONPATH": str(lib)})
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip()) == (lib / "vmq" / "_csrc").resolve()


def _env():
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VMQ_CUDA_KERNELS")}


def test_nvrtc_ops_are_the_cuda_kernel_ops_with_their_schemas():
    assert set(nvrtc.IMPLS) == {op for op, d in CAPABILITIES.items() if d["cuda"] == "kernel"}, \
        "CAPABILITIES' CUDA kernels and vmq.ops.nvrtc's differ: an op needs its NVRTC binding"
    for op, fn in nvrtc.IMPLS.items():
        schema = [a.name for a in getattr(torch.ops.vmq, op).default._schema.arguments]
        params = inspect.signature(fn).parameters
        assert list(params)[:len(schema)] == schema, op
        assert all(p.default is not p.empty for p in list(params.values())[len(schema):]), op


def test_cuda_path_choice(monkeypatch):
    registered = []
    monkeypatch.setattr(nvrtc, "register", lambda ops: registered.append(ops))
    monkeypatch.setattr(nvrtc, "unavailable", lambda: "no CUDA device is available")
    for env, native, path in (("auto", True, "vmq._C"), ("native", True, "vmq._C"), ("nvrtc", True, "vmq._C"),
                              ("auto", False, "none"), ("native", False, "none"), ("nvrtc", False, "none")):
        monkeypatch.setenv(nvrtc.ENV, env)
        got = nvrtc.install(native_cuda=native)
        assert got.path == path, (env, native)
        assert got.describe().startswith(f"{path} (")
    assert "VMQ_CUDA_KERNELS=nvrtc cannot be served: no CUDA device" in nvrtc.install(native_cuda=True).detail
    assert registered == []
    monkeypatch.setenv(nvrtc.ENV, "gpu")
    with pytest.raises(VmqError, match="VMQ_CUDA_KERNELS must be one of auto, native, nvrtc"):
        nvrtc.install(native_cuda=True)
    if importlib.util.find_spec("cupy") is not None:  # NVRTC possible: registered, over vmq._C's with nvrtc
        monkeypatch.setattr(nvrtc, "unavailable", lambda: None)
        for env, native in (("auto", False), ("nvrtc", True)):
            monkeypatch.setenv(nvrtc.ENV, env)
            assert re.fullmatch(r"nvrtc \(CuPy \S+, NVRTC \d+\.\d+\)", nvrtc.install(native_cuda=native).describe())
        assert registered == [tuple(sorted(nvrtc.IMPLS))] * 2


def test_registration_serves_the_cuda_dispatch_key():
    """In a fresh process: the NVRTC implementations registered (no GPU needed) are the ops' CUDA
    kernels, over vmq._C's where it has them."""
    code = ("import torch\nfrom vmq.ops import nvrtc\nnvrtc.register(tuple(sorted(nvrtc.IMPLS)))\n"
            "for op in nvrtc.IMPLS:\n"
            "    assert torch._C._dispatch_has_kernel_for_dispatch_key(f'vmq::{op}', 'CUDA'), op\n"
            "    line = [l for l in torch._C._dispatch_dump_table(f'vmq::{op}').splitlines() if l.startswith('CUDA:')]\n"
            "    assert 'nvrtc' in line[0], line\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=_env())
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_the_dispatcher_passes_the_schemas_arguments_to_the_bindings():
    """The registered bindings called through the CUDA dispatch key (on CPU tensors, device checks
    off and launches recorded, in a fresh process): the dispatcher's arguments (Tensor[], optional
    tensors, int, bool, str) arrive as the bindings expect them."""
    code = ("import contextlib, torch\n"
            "from vmq.ops import nvrtc\nfrom vmq.ops.nvrtc import build, common, gemm, scan\n"
            "from tests.test_kernels import _linear_inputs, _multi_scan_inputs\n"
            "got = []\nbuild.launch = lambda op, kernel, device, grid, block, args: got.append(kernel.name)\n"
            "for m in (common, gemm, scan):\n    m.is_cuda = lambda t: True\n"
            "gemm.check_tensor_cores = lambda t, op: None\n"
            "torch.cuda.device = lambda d: contextlib.nullcontext()\n"
            "nvrtc.register(tuple(sorted(nvrtc.IMPLS)))\n"
            "key = torch._C.DispatchKeySet('CUDA')\n"
            "out = torch.ops.vmq.int8_linear.default.redispatch(key, *_linear_inputs(2, 5, 32, 16)[:6], None, None, 8)\n"
            "assert out.shape == (2, 5, 16) and got == ['vmq::cuda::int_gemm_kernel<8>'], got\n"
            "lin = _linear_inputs(2, 5, 32, 16)\n"
            "try:\n    torch.ops.vmq.int8_linear.default.redispatch(key, *lin[:6], None, None, 8, lin[3].sum(1))\n"
            "except RuntimeError as e:\n    assert 'w_sum must be the int32 (16,) row sums' in str(e), e\n"
            "else:\n    raise AssertionError('an int64 w_sum passed')\n"
            "args = _multi_scan_inputs('local', 2, 12, 4, layout='mixed', shared_u=True, merge='none')\n"
            "out = torch.ops.vmq.multi_scan.default.redispatch(key, *args)\n"
            "assert out.shape == (2, 4, 12, 15) and got[-1] == 'vmq::cuda::multi_scan_kernel<float, float, 4>', got\n"
            "print('ok')\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=_env())
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-2000:]


def test_vmq_env_reports_the_cuda_path():
    line = kernels()["cuda_kernels"]
    assert line == _library.CUDA_KERNELS.describe()
    assert re.match(r"(vmq\._C \(compiled|nvrtc \(CuPy |none \()", line), line


def test_a_missing_cuda_kernel_names_cupy(monkeypatch):
    cuda_x = types.SimpleNamespace(device=torch.device("cuda"))
    monkeypatch.setattr(_library, "has_kernel", lambda op, dev: False)
    monkeypatch.setattr(_library, "CUDA_KERNELS", nvrtc.CudaKernels("none", "vmq._C has no CUDA kernels; NVRTC "
                                                                            "cannot build them: a reason"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cupy" else real(name, *a))
    package = f"cupy-cuda{(torch.version.cuda or '12').split('.')[0]}x" if torch.version.cuda else "cupy-cuda"
    for native, start in ((object(), "vmq._C was built without a cuda kernel for int8_linear; rebuild"),
                          (None, "the cuda kernel of int8_linear needs the vmq._C extension")):
        monkeypatch.setattr(_library, "NATIVE", native)
        with pytest.raises(VmqError) as err:
            use_native("int8_linear", cuda_x, "cuda")
        msg = str(err.value)
        assert msg.startswith(start) and f"pip install {package}" in msg and "\n" not in msg, msg
        assert (BUILD_FIX in msg) == (native is None)
    monkeypatch.setattr(importlib.util, "find_spec", real)
    if real("cupy") is not None:
        with pytest.raises(VmqError, match=r"NVRTC path through CuPy is off: .*a reason"):
            use_native("int8_linear", cuda_x, "cuda")


# ---- the Python bindings on CPU tensors: checks, outputs and launch plans -----------------------

@pytest.fixture
def launches(monkeypatch):
    """Run the NVRTC bindings on CPU tensors: the device checks pass, launches are recorded."""
    got = []
    monkeypatch.setattr(build, "launch", lambda op, kernel, device, grid, block, args: got.append(
        types.SimpleNamespace(op=op, name=kernel.name, grid=tuple(grid), block=block, args=args)))
    for module in (common, gemm, scan, scan_train):
        monkeypatch.setattr(module, "is_cuda", lambda t: True)
    monkeypatch.setattr(gemm, "check_tensor_cores", lambda t, op: None)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    return got


def test_gemm_bindings_plan_the_launchers_launches(launches):
    x_q, xs, zp, w, ws, bias, os_, oz = _linear_inputs(2, 65, 96, 200)
    out = gemm.int8_linear(x_q, xs, zp, w, ws, bias, None, None, 8)
    (la,) = launches
    a, vec_x, vec_w = la.args
    assert out.shape == (2, 65, 200) and out.dtype == torch.float32
    assert (la.name, la.grid, la.block) == ("vmq::cuda::int_gemm_kernel<8>", (3, 4), 128)
    assert (a.m, a.n, a.k, a.rows_per_param, a.out_bits) == (130, 200, 96, 65, 8)
    assert (a.x, a.out_f, a.out_q, a.bias) == (x_q.data_ptr(), out.data_ptr(), None, bias.data_ptr())
    assert vec_x.value and vec_w.value
    q = gemm.int8_linear(x_q, xs, zp, w, ws, None, os_, oz, 6)
    a = launches[-1].args[0]
    assert q.dtype == torch.uint8 and (a.out_f, a.out_q, a.bias, a.out_bits) == (None, q.data_ptr(), None, 6)
    gemm.w4a8_linear(x_q, xs, zp, pack_int4(torch.clamp(w, -8, 7)), ws, bias, None, None, 8)
    assert launches[-1].name == "vmq::cuda::int_gemm_kernel<4>" and launches[-1].args[2].value
    with pytest.raises(RuntimeError, match=r"^int8_linear: w_q must be int8 \(out_features, in_features\)$"):
        gemm.int8_linear(x_q, xs, zp, w.float(), ws, bias, None, None, 8)
    with pytest.raises(RuntimeError, match=r"^int8_linear: x_scale must be \(65,\) or \[2, 65\] \(one value per "
                                           r"token or per row\), got \[3\]$"):
        gemm.int8_linear(x_q, xs[:3], zp, w, ws, bias, None, None, 8)
    with pytest.raises(RuntimeError, match="^int8_linear: x_zero_point must be Int, got Long$"):
        gemm.int8_linear(x_q, xs, zp.long(), w, ws, bias, None, None, 8)
    w_sum = w.sum(1, dtype=torch.int32)  # a cached w_sum goes to the kernel as it is
    gemm.int8_linear(x_q, xs, zp, w, ws, bias, None, None, 8, w_sum)
    assert launches[-1].args[0].w_sum == w_sum.data_ptr()
    with pytest.raises(RuntimeError, match=r"^w4a8_linear: w_sum must be the int32 \(200,\) row sums of the weights, "
                                           r"got Int \[199\]$"):
        gemm.w4a8_linear(x_q, xs, zp, pack_int4(torch.clamp(w, -8, 7)), ws, bias, None, None, 8, w_sum[1:])
    for label, args in _mixed_kind_calls(_linear_inputs(2, 5, 32, 16, seed=3, per_row=True)):
        with pytest.raises(RuntimeError, match=r"^int8_linear: (x_scale|x_zero_point|out_scale|out_zero_point)"
                                               r"( and \w+)? must be (\(5,\) or \[2, 5\]|of )"):
            gemm.int8_linear(*args)
    m = 1 << 20  # rows x out_features > 2^31: refused before the output is made
    big = (torch.zeros(1, m, 1, dtype=torch.uint8), torch.ones(m), torch.zeros(m, dtype=torch.int32))
    with pytest.raises(RuntimeError, match=r"^int8_linear: the CUDA kernel indexes with 32-bit offsets: .* got rows "
                                           r"1048576, in_features 1, out_features 2049$"):
        gemm.int8_linear(*big, torch.zeros(2049, 1, dtype=torch.int8), torch.ones(2049), None, None, None, 8)
    count = len(launches)
    assert gemm.int8_linear(*_linear_inputs(2, 0, 8, 4)[:6], None, None, 8).shape == (2, 0, 4)  # no rows: no launch
    assert len(launches) == count

    x = torch.randn(3, 10, 37)
    q = gemm.quantize_per_token(x, xs[:10], zp[:10], 4)
    la = launches[-1]
    assert q.shape == x.shape and q.dtype == torch.uint8
    assert (la.name, la.grid, la.block) == ("vmq::cuda::quantize_kernel", (2, 1), 256)  # 16 threads per row
    assert [v.value for v in la.args[4:]] == [30, 37, 10, 15.0, 4, False]
    with pytest.raises(RuntimeError, match=r"^quantize_per_token: scale and zero_point must be of one kind \(per token "
                                           r"or per row\), got \[3, 10\] and \[10\]$"):
        gemm.quantize_per_token(x, torch.ones(3, 10), zp[:10], 8)
    with pytest.raises(RuntimeError, match=r"^quantize_per_token: zero_point must be \(10,\) or \[3, 10\] "):
        gemm.quantize_per_token(x, xs[:10], zp[:30], 8)

    x, codes, cb, rpg, s, bias = _vq_inputs(65, 192, 384, 8, 256, 384)
    out = gemm.vq_linear(x, codes, cb, rpg, s, bias)
    la = launches[-1]
    a = la.args[0]
    assert out.shape == (2, 65, 384) and (la.name, la.grid) == ("vmq::cuda::vq_gemm_kernel<true>", (3, 6))
    assert (a.m, a.n, a.k, a.cols, a.size, a.dim, a.rows_per_group, a.x_half) == (130, 384, 192, 24, 256, 8, 384, False)
    gemm.vq_linear(x.half(), codes, cb, rpg, s, bias)  # fp16 x: fp16 operands
    assert launches[-1].name == "vmq::cuda::vq_gemm_kernel<false>" and launches[-1].args[0].x_half
    bad = codes.clone()
    bad[0, 0] = 256  # codes are not checked per call (no host synchronisation): the kernel reads NaN
    gemm.vq_linear(x, bad, cb, rpg, s, bias)
    assert launches[-1].args[0].codes == bad.data_ptr()
    with pytest.raises(RuntimeError, match=r"^vq_linear: the CUDA kernel indexes with 32-bit offsets: .* got x "
                                           r"\[1, 1048576, 1\], codes \[2049, 1\], codebook \[1, 2, 1\]$"):
        gemm.vq_linear(torch.zeros(1, 1 << 20, 1), torch.zeros(2049, 1, dtype=torch.int32),
                       torch.zeros(1, 2, 1).half(), 2049, None, None)

    pts, c = torch.randn(1000, 12), torch.randn(300, 12)
    codes, dist = gemm.kmeans_assign(pts, torch.rand(12).expand(1000, 12), c)
    la = launches[-1]
    assert codes.dtype == torch.int64 and dist.shape == (1000,)
    assert (la.name, la.grid, la.block) == ("vmq::cuda::kmeans_assign_kernel<32>", (8,), 128)
    assert [v.value for v in la.args[4:7]] == [1000, 300, 12] and la.args[2].value == 0  # expanded weight: stride 0
    with pytest.raises(RuntimeError, match="the CUDA kernel takes 1 to 32 dimensions, got 33"):
        gemm.kmeans_assign(torch.randn(5, 33), None, torch.randn(2, 33))
    with pytest.raises(RuntimeError, match="^kmeans_assign: no CUDA kernel for these dtypes / sizes"):
        gemm.kmeans_launch(0, 0, 0, 0, 5, 0, 4, 0, 0)  # no centroids: the launcher refuses


def _gemm_args(struct, n, **fields):
    return structs.fill(struct(), m=3, n=n, k=16, **fields)


@pytest.mark.parametrize("n,grid_y", [(1, 1), (6401, 101), (64 * 65535, 65535), (64 * 65535 + 65, 65535),
                                      (1 << 27, 65535)])
def test_gemm_grids_clamp_to_65535_channel_blocks(n, grid_y):
    """launch_int_gemm / launch_vq_gemm: 64-row blocks on x, 64-channel blocks on y up to 65535 (the kernels loop)."""
    plans = [gemm.int_gemm_launch(_gemm_args(structs.GemmArgs, n, x=16, w=16), bits, "op") for bits in (8, 4)]
    plans += [gemm.vq_gemm_launch(_gemm_args(structs.VqGemmArgs, n, x_half=half)) for half in (False, True)]
    assert [(kernel.name, grid, block) for kernel, grid, block, _ in plans] == [
        (f"vmq::cuda::{name}", (1, grid_y), 128) for name in ("int_gemm_kernel<8>", "int_gemm_kernel<4>",
                                                              "vq_gemm_kernel<true>", "vq_gemm_kernel<false>")]
    assert gemm.int_gemm_launch(_gemm_args(structs.GemmArgs, 0), 8, "op") is None
    with pytest.raises(RuntimeError, match="^w2_linear: no CUDA kernel for these dtypes / sizes"):
        gemm.int_gemm_launch(_gemm_args(structs.GemmArgs, n), 2, "w2_linear")


@pytest.mark.parametrize("rows,cols,lanes_log2,grid", [
    (1000, 1, 0, (4, 1)), (1000, 4, 0, (4, 1)), (1000, 5, 1, (8, 1)), (30, 37, 4, (2, 1)), (70001, 520, 8, (70001, 1)),
    (3, 1024, 8, (3, 1)), (3, 1025, 8, (3, 2)), (1, 65535 * 1024 + 5, 8, (1, 65535)), (0, 8, None, None),
    (8, 0, None, None)])
def test_quantize_grid_has_rows_on_x_and_column_chunks_on_y(rows, cols, lanes_log2, grid):
    """launch_quantize_per_token: 2^l threads per row (4 values each, the fewest that hold it, at most 256), 256 >> l
    rows per block on x, chunks of 4 << l columns on y up to 65535 (looping past it); float4 loads where aligned."""
    plan = gemm.quantize_launch(4096, 64, 128, 8192, rows, cols, 7, 8)
    if grid is None:
        assert plan is None
        return
    kernel, got, block, args = plan
    assert (kernel.name, got, block) == ("vmq::cuda::quantize_kernel", grid, 256)
    assert [a.value for a in args[4:]] == [rows, cols, 7, 255.0, lanes_log2, cols % 4 == 0]
    for x, q in ((4096 + 4, 8192), (4096, 8192 + 2)):  # misaligned: the scalar path
        assert gemm.quantize_launch(x, 64, 128, q, rows, cols, 7, 8)[3][-1].value is False


def test_scan_bindings_plan_the_launchers_launches(launches):
    args = _scan_inputs(2, 200, 33, 17, token_major=True)
    out = scan.bidirectional_scan(*args, None, None, None, None, True, False)
    (la,) = launches
    a = la.args[0]
    assert out.shape == (2, 200, 33) and out.stride(1) == 1
    assert (la.name, la.grid, la.block) == ("vmq::cuda::bidirectional_scan_kernel<float, float, 64>", (2, 2), 128)
    assert (a.batch, a.dim, a.len, a.d_state, a.softplus, a.divide_out) == (2, 200, 33, 17, True, False)
    u, B, z = args[0], args[3], args[12]
    assert (a.fwd.u.p, a.fwd.u.s0, a.fwd.u.s1, a.fwd.u.s2) == (u.data_ptr(), *u.stride())
    assert (a.fwd.B.p, a.z.p, a.out) == (B.data_ptr(), z.data_ptr(), out.data_ptr())
    assert a.bwd.u.p == args[6].data_ptr() and a.value_type == structs.SCAN_TYPE["kFloat"]
    half = list(args)
    half[3] = half[3].half()
    with pytest.raises(RuntimeError, match="^bidirectional_scan: float32 u and delta go with float32 B, C and z$"):
        scan.bidirectional_scan(*half, None, None, None, None, True, True)
    with pytest.raises(RuntimeError, match=r"^bidirectional_scan: the CUDA kernel takes up to 65535 samples \(its "
                                           r"grid's y\), got 65536$"):
        scan.bidirectional_scan(*_scan_inputs(65536, 1, 1, 1), None, None, None, None, True, True)
    a.batch = 65536  # the launchers refuse what the bindings should have refused
    with pytest.raises(RuntimeError, match="^bidirectional_scan: no CUDA kernel for these dtypes / sizes"):
        scan.scan_launch(a)

    base = _multi_scan_inputs("cross", 2, 33, 16, layout="mixed", merge="mean")
    K, rep = 10, lambda x: torch.cat([x] * 3)[:10]  # noqa: E731
    margs = [[base[0][0]] * K, [base[1][0]] * K, rep(base[2]).contiguous(), [base[3][0]] * K, [base[4][0]] * K,
             rep(base[5]).contiguous(), None, base[7], rep(base[8]).contiguous(), rep(base[9]).contiguous(), None, None,
             *base[12:]]
    out = scan.multi_scan(*margs)
    first, second = launches[1:]
    assert out.shape == (2, 33, 15)
    assert (first.name, first.grid) == ("vmq::cuda::multi_scan_kernel<float, float, 16>", (1, 2))
    a, l1 = first.args
    l2 = second.args[1]
    assert (a.K, a.merge, a.dirs, l1.k0, l1.count, l1.first, l1.last) == (10, structs.SCAN_MERGE["kMean"], None, 0, 8,
                                                                         True, False)
    assert (l2.k0, l2.count, l2.first, l2.last) == (8, 2, False, True)
    A, D = margs[2], margs[5]
    assert l2.dir[1].A == A.data_ptr() + 4 * 9 * 33 * 16 and l2.dir[1].D == D.data_ptr() + 4 * 9 * 33
    assert l2.dir[1].delta_bias is None and l2.dir[1].u.p == margs[0][9].data_ptr()
    with pytest.raises(RuntimeError, match="^multi_scan: merge must be sum, mean or none, got max$"):
        scan.multi_scan(*margs[:14], "max")


def test_scan_train_bindings_plan_the_launchers_launches(launches):
    u, delta, A, B, C = (torch.rand(*s) for s in ((2, 130, 33), (2, 130, 33), (130, 17), (2, 33, 17), (2, 33, 17)))
    y = scan_train.scan_train_fwd(u, delta, A, B, C)
    gu, _, gA, gB, gC = scan_train.scan_train_bwd(u, delta, A, B, C, torch.randn(2, 33, 130).transpose(1, 2))
    fwd, ckpt, bwd = launches  # 64 channels of a sample per block; the backward after checkpoints every 16 tokens
    assert [(la.name, la.grid, la.block) for la in launches] == [
        (f"vmq::cuda::scan_train_{k}_kernel<64>", (3, 2), 64) for k in ("fwd", "fwd", "bwd")]
    a, g = fwd.args[0], bwd.args[1]
    assert (a.u, a.C, a.batch, a.dim, a.len, a.d_state) == (u.data_ptr(), C.data_ptr(), 2, 130, 33, 17)
    assert (fwd.args[1].value, fwd.args[2].value, ckpt.args[1].value) == (y.data_ptr(), None, None)
    assert (ckpt.args[2].value, g.gu, g.gC) == (g.ckpt, gu.data_ptr(), gC.data_ptr())
    assert gA.shape == (130, 17) and not gA.any() and not gB.any()  # zeroed for the kernel's atomics
    plans = [scan_train.fwd_launch(structs.ScanTrainArgs(batch=1, dim=1, len=1, d_state=n), 0) for n in (0, 4, 5, 64)]
    assert [p[0].name.split("<")[1] for p in plans] == ["4>", "4>", "16>", "64>"]  # the kernels' kMaxN
    with pytest.raises(RuntimeError, match="^scan_train_fwd: B must be contiguous$"):
        scan_train.scan_train_fwd(u, delta, A, B.transpose(1, 2).contiguous().transpose(1, 2), C)
