"""Install vmq and build its native extension ``vmq._C`` from ``csrc/``.

``csrc/cpu/*.cpp`` is always compiled. ``csrc/cuda/*.cu`` (with the ``.cpp`` bindings beside
them) is compiled too when torch is a CUDA build and a CUDA toolkit is found. Environment:

* ``VMQ_BUILD_CUDA``: ``auto`` (default), ``1`` (fail without a toolkit) or ``0`` (CPU only).
* ``TORCH_CUDA_ARCH_LIST``: GPU architectures (default ``8.0;8.6;8.9;9.0``).
* ``CUDA_HOME``: the toolkit root; when unset, the root of the ``nvcc`` on PATH (followed through
  wrapper scripts) or ``/usr/local/cuda``.
* ``VMQ_CPU_ARCH``: the ``-march`` of the CPU kernels: ``native`` (default, this machine's
  processor: AVX-512 VNNI, AVX2, ... as it has them), another GCC value such as ``x86-64-v3``
  (AVX2, no AVX-512), or ``portable`` (the compiler's default target).
* ``VMQ_NO_EXTENSION=1``: install the pure-PyTorch package only (every op then runs its
  reference twin).

The CUDA kernel sources also ship inside the package (``vmq/_csrc/cuda``): where vmq._C has no
CUDA kernels, ``vmq.ops.nvrtc`` builds them at run time with CuPy's NVRTC (``vmq[cupy]``).

The build needs torch at build time: ``pip install --no-build-isolation -e .``
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
version = {}
exec((ROOT / "vmq" / "__init__.py").read_text(), version)


def _is_toolkit(root: Path) -> bool:
    return (root / "bin" / "nvcc").is_file() and (root / "include" / "cuda_runtime.h").is_file()


def find_cuda_home():
    """The CUDA toolkit root, or None. ``which nvcc`` may be a wrapper script in /usr/local/bin."""
    if os.environ.get("CUDA_HOME"):
        root = Path(os.environ["CUDA_HOME"])
        if not _is_toolkit(root):
            sys.exit(f"CUDA_HOME={root} holds no bin/nvcc and include/cuda_runtime.h")
        return root
    candidates = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(os.path.realpath(nvcc)).parent.parent)
        try:  # a wrapper script: ask the real compiler where it lives
            out = subprocess.run([nvcc, "--dryrun", "-E", "-x", "cu", os.devnull], capture_output=True, text=True, timeout=60)
            m = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
            if m:
                candidates.append(Path(m.group(1)))
        except (OSError, subprocess.SubprocessError):
            pass
    candidates.append(Path("/usr/local/cuda"))
    for root in candidates:
        if _is_toolkit(root):
            return root.resolve()
    return None


class BuildPyWithKernelSources(build_py):
    """Also copy ``csrc/cuda``'s torch-free kernel sources (``*.cu``, ``*.cuh``, ``*.h`` but the
    bindings' ``binding.h``) into the built package as ``vmq/_csrc/cuda``, for vmq.ops.nvrtc.
    An editable install reads them from the checkout instead (no copy that could go stale)."""

    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dst = Path(self.build_lib) / "vmq" / "_csrc" / "cuda"
        dst.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "csrc" / "cuda").iterdir()):
            if src.suffix in (".cu", ".cuh", ".h") and src.name != "binding.h":
                self.copy_file(str(src), str(dst / src.name))


def extensions():
    if os.environ.get("VMQ_NO_EXTENSION") == "1":
        return [], {}
    want_cuda = os.environ.get("VMQ_BUILD_CUDA", "auto")
    if want_cuda not in ("auto", "0", "1"):
        sys.exit(f"VMQ_BUILD_CUDA must be auto, 0 or 1, got {want_cuda!r}")
    cuda_home = None
    if want_cuda != "0":
        cuda_home = find_cuda_home()
        if cuda_home is not None:
            # torch reads CUDA_HOME when cpp_extension is first imported
            os.environ["CUDA_HOME"] = str(cuda_home)
    import torch
    from torch.utils import cpp_extension

    build_cuda = want_cuda != "0" and torch.version.cuda is not None and cuda_home is not None
    if want_cuda == "1" and not build_cuda:
        sys.exit("VMQ_BUILD_CUDA=1 but " + ("torch is a CPU-only build" if torch.version.cuda is None
                                             else "no CUDA toolkit was found (set CUDA_HOME)"))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;8.9;9.0")

    cxx = ["-O3", "-ffp-contract=fast", "-fopenmp", "-Wall", "-Wno-unused-function"]
    cpu_arch = os.environ.get("VMQ_CPU_ARCH", "native")
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", cpu_arch):
        sys.exit(f"VMQ_CPU_ARCH: not a -march value: {cpu_arch!r}")
    if cpu_arch != "portable":
        cxx.append(f"-march={cpu_arch}")
    sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc").glob("*.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cpu").glob("*.cpp"))
    common = dict(include_dirs=[str(ROOT / "csrc")], extra_link_args=["-fopenmp"])
    if build_cuda:
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cpp"))
        sources += sorted(str(p.relative_to(ROOT)) for p in (ROOT / "csrc" / "cuda").glob("*.cu"))
        # no --use_fast_math: its flush-to-zero would break the integer kernels' bit-identical epilogues
        # (the scan calls the fast __expf where it wants it)
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr"]
        ext = cpp_extension.CUDAExtension("vmq._C", sources, define_macros=[("VMQ_WITH_CUDA", "1")],
                                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **common)
    else:
        ext = cpp_extension.CppExtension("vmq._C", sources, extra_compile_args={"cxx": cxx}, **common)
    print(f"vmq: building vmq._C with {'CPU and CUDA' if build_cuda else 'CPU'} kernels"
          + (f" (CUDA_HOME={cuda_home}, arch {os.environ['TORCH_CUDA_ARCH_LIST']})" if build_cuda else ""),
          file=sys.stderr)
    if not build_cuda and want_cuda == "auto" and torch.version.cuda is not None:
        print(f"vmq: no CUDA toolkit (nvcc) found: for the CUDA kernels without one, `pip install "
              f"cupy-cuda{torch.version.cuda.split('.')[0]}x` (vmq builds them at run time with its NVRTC)",
              file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extensions()
cmdclass = {**cmdclass, "build_py": BuildPyWithKernelSources}

setup(
    name="vmq",
    version=version["__version__"],
    description="Compression toolchain for Vision Mamba models: PTQ (PTQ4VM), VQ (ViM-VQ), packed files, kernels",
    long_description=(ROOT / "README.md").read_text(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["vmq", "vmq.*"]) + ["vmq_cli"],
    package_dir={"vmq_cli": "cli"},
    package_data={"vmq.assets": ["*.safetensors", "*.npz", "*.md", "*.json"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch==2.14.1",
        "torchvision==0.29.1",
        "timm>=1.0",
        "safetensors>=0.4",
        "click>=8.1",
        "rich>=13",
        "pyyaml>=6",
        "pydantic>=2",
        "numpy",
        "pillow",
    ],
    extras_require={
        # CuPy for torch's CUDA 13: NVRTC builds of the CUDA kernels where vmq._C has none (vmq.ops.nvrtc)
        "cupy": ["cupy-cuda13x"],
        "gpu": ["mamba-ssm", "cupy-cuda13x"],
        # cupy: the NVRTC compile test of csrc/cuda (no GPU needed); hypothesis: the fuzz tests
        "test": ["pytest", "ninja", "cupy-cuda13x", "hypothesis"],
        "train": ["ninja"],
    },
    entry_points={"console_scripts": ["vmq=vmq_cli.main:main"]},
)
