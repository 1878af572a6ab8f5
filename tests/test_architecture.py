"""The architecture's rules, checked on the source: the family boundary, imports, file sizes."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted(p for d in ("vmq", "cli") for p in (ROOT / d).rglob("*.py"))

# Names that belong to the Vim family: they may appear in vmq/models/ only. Everything else asks
# the family (vmq.models.family.ModelFamily).
VIM_NAMES = re.compile(r"VimConfig|MambaMixer|\bscan_fn\b|\bnum_tokens\b|mixer"
                       r"|layers\\?\.(\{|\\d|[0-9])|[\"']layers\.[\"']")


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_family_boundary():
    """No Vim-specific name outside vmq/models/: code, strings, comments and docstrings alike."""
    found = []
    for path in SOURCES:
        if _rel(path).startswith("vmq/models/"):
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if VIM_NAMES.search(line):
                found.append(f"{_rel(path)}:{n}: {line.strip()}")
    assert not found, "Vim-specific names outside vmq/models/:\n" + "\n".join(found)


def test_family_boundary_check_catches_what_it_should():
    for line in ('m.scan_fn = f', 'x = model.layers[0].mixer', 'p = f"layers.{i}."', r'"re:layers\.\d+\.in_proj"',
                 'cfg.num_tokens', 'VimConfig()', "prefix = 'layers.'"):
        assert VIM_NAMES.search(line), line
    for line in ("selective_scan_fn(u)", "tokens = st.tokens", "blocks = family.blocks(model)"):
        assert not VIM_NAMES.search(line), line


def _function_level_imports(path: Path):
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module and inner.module.split(".")[0] == "vmq":
                    yield inner.lineno, inner.module
                elif isinstance(inner, ast.Import):
                    for alias in inner.names:
                        if alias.name.split(".")[0] == "vmq":
                            yield inner.lineno, alias.name


def test_no_function_level_imports_of_vmq_inside_vmq():
    """Inside the library, vmq modules import each other at the top (no hidden cycles); only
    optional heavy third-party packages are imported lazily. (cli/ imports vmq lazily on purpose:
    `vmq --help` must not import torch.)"""
    found = [f"{_rel(p)}:{line}: {mod}" for p in SOURCES if _rel(p).startswith("vmq/")
             for line, mod in _function_level_imports(p)]
    assert not found, "function-level vmq imports:\n" + "\n".join(found)


@pytest.mark.parametrize("module", ["vmq.models", "vmq.layers", "vmq.pack.format", "vmq.compress", "vmq.ops"])
def test_each_module_imports_on_its_own(module):
    """A fresh interpreter imports each package alone (an import cycle would fail here)."""
    subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT)


def test_loading_a_packed_file_imports_no_compression_code():
    code = ("import sys, vmq.pack.format; "
            "bad = [m for m in sys.modules if m.startswith(('vmq.compress', 'vmq.quant', 'vmq.vq', 'vmq.calib', "
            "'vmq.optimise'))]; print(bad); assert not bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


MAX_LINES = 420  # "about 400"


def test_no_giant_files():
    big = [f"{_rel(p)}: {n}" for p in SOURCES
           if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES]
    assert not big, f"files over {MAX_LINES} lines: {big}"
