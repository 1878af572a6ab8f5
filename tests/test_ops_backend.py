"""Kernel choice in vmq.ops: the scoped backend, the capability table, the twins and their registration.

Runs without vmq._C too; where a check needs the compiled extension it says so.
"""

import inspect
import subprocess
import sys
import threading
import types
from pathlib import Path

import pytest
import torch

import vmq.ops
from tests.test_kernels import _opcheck_cases, _opcheck_op
from vmq.errors import VmqError
from vmq.ops import _defaults, _library
from vmq.ops.backend import CAPABILITIES, current_backend, use_backend, use_native
from vmq.ops.norm import rms_norm, rms_norm_ref

ROOT = Path(__file__).resolve().parents[1]


def _schema_args(op):
    return [a.name for a in getattr(torch.ops.vmq, op).default._schema.arguments]


def _fake_tensor(device):
    """Stands for an input on ``device`` (use_native reads only its device)."""
    return types.SimpleNamespace(device=torch.device(device))


def test_use_backend_is_scoped_and_nests():
    assert current_backend() == "auto"
    with use_backend("ref") as name:
        assert name == "ref" and current_backend() == "ref"
        with use_backend("cpu"):
            assert current_backend() == "cpu"
        assert current_backend() == "ref"
    assert current_backend() == "auto"
    with pytest.raises(KeyError):
        with use_backend("cuda"):
            raise KeyError("inside")
    assert current_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        with use_backend("gpu"):
            pass
    assert current_backend() == "auto"


def test_use_backend_does_not_leak_into_other_threads():
    seen = []
    with use_backend("ref"):
        t = threading.Thread(target=lambda: seen.append(current_backend()))
        t.start()
        t.join()
    assert seen == ["auto"]


def test_wrappers_follow_the_scope_unless_given_a_backend():
    x, w = torch.randn(2, 3, 8), torch.randn(8)
    with use_backend("cuda"):  # CPU tensors: the cuda kernel is refused, as with backend="cuda"
        with pytest.raises(VmqError, match="tensors are on cpu"):
            rms_norm(x, w, 1e-5)
        assert torch.equal(rms_norm(x, w, 1e-5, backend="ref"), rms_norm_ref(x, w, 1e-5))
    with use_backend("ref"):
        assert use_native("rms_norm", x, None) is False
    if _library.has_kernel("rms_norm", "cpu"):
        assert use_native("rms_norm", x, None) is True
        with use_backend("cpu"):
            assert use_native("rms_norm", x, None) is True


def test_capability_table_covers_every_op():
    assert set(CAPABILITIES) == set(_library.SCHEMAS)
    for op, devices in CAPABILITIES.items():
        assert set(devices) == {"cpu", "cuda"}, op
        assert set(devices.values()) <= {"kernel", "fallback"}, op


@pytest.mark.skipif(_library.NATIVE is None, reason=f"vmq._C is {_library.NATIVE_ERROR}")
def test_capability_table_matches_the_compiled_kernels():
    for op, devices in CAPABILITIES.items():
        assert _library.has_kernel(op, "cpu") == (devices["cpu"] == "kernel"), op
        if _library.CUDA_KERNELS.path != "none":  # vmq._C's CUDA kernels, or their NVRTC build
            assert _library.has_kernel(op, "cuda") == (devices["cuda"] == "kernel"), op
        else:
            assert not _library.has_kernel(op, "cuda"), op


def test_explicit_device_without_kernel_by_design_runs_the_twin(monkeypatch):
    cuda_x = _fake_tensor("cuda")
    asked = []
    monkeypatch.setattr(_library, "has_kernel", lambda op, dev: asked.append((op, dev)) or False)
    for op, devices in CAPABILITIES.items():
        if devices["cuda"] == "fallback":
            assert use_native(op, cuda_x, "cuda") is False, op
            assert use_native(op, cuda_x, "cuda", takes=False) is False, op
    assert asked == []  # the table decides, before any kernel lookup
    # an op that should have a CUDA kernel but the build lacks it: one clear error
    monkeypatch.setattr(_library, "NATIVE", object())
    with pytest.raises(VmqError, match="built without a cuda kernel for int8_linear"):
        use_native("int8_linear", cuda_x, "cuda")
    monkeypatch.setattr(_library, "has_kernel", lambda op, dev: True)
    assert use_native("int8_linear", cuda_x, "cuda") is True
    with pytest.raises(VmqError, match="the cuda kernel of int8_linear takes uint8"):
        use_native("int8_linear", cuda_x, "cuda", takes=False, why="takes uint8 activations")
    assert use_native("int8_linear", cuda_x, "auto", takes=False) is False
    # the device check comes first: CPU tensors with backend cuda stay an error, fallback or not
    with pytest.raises(VmqError, match="tensors are on cpu"):
        use_native("rms_norm", _fake_tensor("cpu"), "cuda")


def test_every_op_has_a_twin_with_its_schema_arguments():
    for op in _library.SCHEMAS:
        twin = getattr(vmq.ops, f"{op}_ref", None)
        assert twin is not None, f"vmq.ops.{op}_ref is missing"
        assert f"{op}_ref" in vmq.ops.__all__
        assert list(inspect.signature(twin).parameters) == _schema_args(op), op
        assert _defaults.TWINS[op] is twin, op


def test_twins_are_the_default_kernels():
    for op in _library.SCHEMAS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"vmq::{op}", "CompositeExplicitAutograd"), op
        # a device with no compiled kernel gets the default ...
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"vmq::{op}", "XPU"), op


def test_has_kernel_reports_compiled_kernels_only():
    for op, devices in CAPABILITIES.items():
        for device in ("cpu", "cuda"):
            compiled = torch._C._dispatch_has_kernel_for_dispatch_key(f"vmq::{op}", device.upper())
            # CUDA: vmq._C's kernels or their NVRTC build (vmq.ops.nvrtc), as _library.CUDA_KERNELS says
            registered = _library.CUDA_KERNELS.path != "none" if device == "cuda" else _library.NATIVE is not None
            assert _library.has_kernel(op, device) == (registered and compiled), (op, device)
        if devices["cuda"] == "fallback":
            # ... which runs there, but is not a compiled kernel
            assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"vmq::{op}", "CUDA")
            assert not _library.has_kernel(op, "cuda")


def _same(a, b):
    if isinstance(a, (tuple, list)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _same(x, y)
    else:
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("case", sorted(_opcheck_cases()))
def test_default_kernel_is_the_twin_in_the_fake_layout(case):
    """The registered default run directly (a dispatch key without compiled kernels): the twin's
    values, with the dtypes, shapes and strides of the op's fake implementation."""
    op = _opcheck_op(case)
    args = _opcheck_cases()[case]
    out = getattr(torch.ops.vmq, op).default.redispatch(torch._C.DispatchKeySet("XPU"), *args)
    _same(out, _defaults.TWINS[op](*args))
    meta = getattr(torch.ops.vmq, op)(*[a.to("meta") if isinstance(a, torch.Tensor) else a for a in args])
    for o, m in zip(out if isinstance(out, tuple) else (out,), meta if isinstance(meta, tuple) else (meta,)):
        assert (o.dtype, o.shape, o.stride()) == (m.dtype, m.shape, m.stride()), op


def test_ops_run_and_pass_opcheck_without_the_extension():
    """With vmq._C blocked, every torch.ops.vmq op runs (its default twin) and passes opcheck."""
    code = (
        "import sys; sys.modules['vmq._C'] = None\n"
        "import torch\n"
        "from vmq.ops import _library\n"
        "assert _library.NATIVE is None and _library.NATIVE_ERROR == 'not built'\n"
        "assert not any(_library.has_kernel(op, d) for op in _library.SCHEMAS for d in ('cpu', 'cuda'))\n"
        "from tests.test_kernels import _opcheck_cases, _opcheck_op\n"
        "cases = _opcheck_cases()\n"
        "assert {_opcheck_op(c) for c in cases} == set(_library.SCHEMAS)\n"
        "for name, args in sorted(cases.items()):\n"
        "    torch.library.opcheck(getattr(torch.ops.vmq, _opcheck_op(name)), args)\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr[-3000:]


def test_ops_package_does_not_import_pack():
    code = "import sys; import vmq.ops; print(sorted(m for m in sys.modules if m.startswith('vmq.pack')))"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "[]", run.stderr[-3000:]


def test_no_function_level_vmq_imports_in_ops():
    for path in (ROOT / "vmq" / "ops").glob("*.py"):
        for line in path.read_text().splitlines():
            if line.startswith((" ", "\t")) and line.strip().startswith(("import vmq", "from vmq")):
                pytest.fail(f"{path.name}: function-level import {line.strip()!r}")

