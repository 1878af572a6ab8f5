import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("VMQ_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures"


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true",
                     help="also run the tests marked slow (the README's accuracy claims, minutes each; make test-slow)")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: checks a README accuracy claim with full default recipes (minutes "
                                       "each); runs with --run-slow, as `make test-slow` does")
    expect = os.environ.get("VMQ_EXPECT_ROOT")  # make test-isa: the scratch build must be the one imported
    if expect:
        import vmq
        from vmq.ops import _library

        for what, path in (("vmq", vmq.__file__), ("vmq._C", getattr(_library.NATIVE, "__file__", None))):
            if path is None or not Path(path).resolve().is_relative_to(Path(expect).resolve()):
                raise pytest.UsageError(f"VMQ_EXPECT_ROOT={expect} but {what} was imported from {path}")
    if os.environ.get("VMQ_REQUIRE_NATIVE") == "1":
        from vmq.ops import _library

        if _library.NATIVE is None:
            raise pytest.UsageError(f"VMQ_REQUIRE_NATIVE=1 but vmq._C is {_library.NATIVE_ERROR}")
        if os.environ.get("VMQ_BUILD_CUDA") == "1" and not _library.NATIVE.cuda_built:
            raise pytest.UsageError("VMQ_BUILD_CUDA=1 but vmq._C was built without its CUDA kernels")
    if os.environ.get("VMQ_CUDA_KERNELS") == "nvrtc" and torch.cuda.is_available():  # a GPU pass on NVRTC's kernels
        from vmq.ops import _library

        if _library.CUDA_KERNELS.path != "nvrtc":
            raise pytest.UsageError(f"VMQ_CUDA_KERNELS=nvrtc but the CUDA kernels are {_library.CUDA_KERNELS.describe()}")


def pytest_report_header(config):
    from vmq.ops import _library

    native = _library.NATIVE
    cuda = f"CUDA kernels: {_library.CUDA_KERNELS.describe()}"
    if native is None:
        return [f"vmq._C: {_library.NATIVE_ERROR}", cuda]
    return [f"vmq._C: {native.__file__} (CPU int8 path {native.cpu_isa}, CUDA kernels {native.cuda_built})", cuda]


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="no CUDA device")
    not_slow = pytest.mark.skip(reason="slow: runs with --run-slow (make test-slow)")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(no_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow"):
            item.add_marker(not_slow)


@pytest.fixture(scope="session")
def fixtures_dir():
    if not FIXTURES.is_dir():
        pytest.skip(f"parity fixtures not found at {FIXTURES}")
    return FIXTURES


#: what a long step prints on stderr while it works (vmq_cli._console.progress off a terminal)
PROGRESS_LINE = re.compile(r"^[\w ()-]+: \d+(/\d+)? \(\d+ s\)$")


def one_error_line(proc, rc=1):
    """The one error line on stderr (progress lines of a slow run aside), with no traceback."""
    assert proc.returncode == rc, proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if not PROGRESS_LINE.match(ln)]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr
    return lines[0]


def noise_image_folder(root: Path, classes, per_class: int, size: int) -> Path:
    """``root/<class>/<i>.png``: ``per_class`` random RGB images of ``size`` x ``size`` per class (seed 0)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


def run_vmq(*args, env=None, cwd=None):
    """Run the installed CLI in a subprocess; returns CompletedProcess with text output."""
    e = dict(os.environ)
    e.pop("VMQ_DEBUG", None)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "vmq_cli.main", *map(str, args)], capture_output=True, text=True,
                          env=e, cwd=cwd, timeout=600)


def fixture_config(path: Path):
    from vmq.models.vim import VimConfig

    c = json.loads((path / "config.json").read_text())["visionmamba_effective_args"]
    return VimConfig(img_size=c["img_size"], patch_size=c["patch_size"], stride=c["stride"],
                     embed_dim=c["embed_dim"], depth=c["depth"], d_state=c["d_state"],
                     num_classes=c["num_classes"], norm_epsilon=c["norm_epsilon"],
                     use_middle_cls_token=c["use_middle_cls_token"], if_divide_out=c["if_divide_out"])
