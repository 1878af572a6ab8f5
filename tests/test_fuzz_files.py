"""Fuzzing the file readers with mutated real files: safetensors checkpoints, calibration stats and
packed files (byte flips, truncations, headers rewritten with random JSON, random packed metadata).

Nothing but :class:`vmq.errors.VmqError` may escape a reader, and reading a mutated file may not
make the process's peak memory grow by more than a bound of the file's size (measured with the
kernel's peak-RSS counter, reset before each example, where /proc allows it).

Example counts: ``EXAMPLES`` per test (derandomized, the same examples on every run), times
``VMQ_FUZZ_SCALE`` (an integer, default 1) for longer runs: ``VMQ_FUZZ_SCALE=50 pytest tests/test_fuzz_files.py``.
"""

import json
import os
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from _packfiles import rewrite_meta, write_files
from vmq.calib import CalibStats
from vmq.errors import VmqError
from vmq.models import read_state_dict
from vmq.pack.format import MAX_EXPANSION, load_packed
from vmq.pack.inspect import inspect_packed
from vmq.safefile import read_header

SCALE = max(1, int(os.environ.get("VMQ_FUZZ_SCALE", "1")))
EXAMPLES = 40


def fuzz_settings(examples: int = EXAMPLES):
    return settings(max_examples=examples * SCALE, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Real(tuple):
    """(files by key: (path, bytes), a folder for mutated files), with a short repr for hypothesis' reports."""

    def __repr__(self):
        return "real-files"


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    folder = tmp_path_factory.mktemp("real")
    files = write_files(folder)
    return Real(({key: (path, path.read_bytes()) for key, path in files.items()}, tmp_path_factory.mktemp("mutated")))


def _peak_rss_kb() -> int:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def read_only_vmq_errors(loader, path: Path, size: int):
    """Run ``loader(path)``: it returns or raises VmqError, and the peak RSS grows by at most
    MAX_EXPANSION x the file's size plus 64 MiB (allocator slack, a model built on the CPU)."""
    measured = _reset_peak()
    before = _peak_rss_kb()
    try:
        loader(path)
    except VmqError as exc:
        assert str(exc) and "\n" not in str(exc).strip()
    if measured:
        grown = (_peak_rss_kb() - before) * 1024
        assert grown <= MAX_EXPANSION * size + (64 << 20), f"peak RSS grew by {grown:,} bytes for a {size:,}-byte file"


LOADERS = {"checkpoint": read_state_dict, "stats": CalibStats.load, "packed": load_packed, "vq": load_packed,
           "inspect": inspect_packed}
SOURCE = {"inspect": "packed"}
KEYS = sorted(LOADERS)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=16)


def _write(real, key: str, data: bytes) -> Path:
    path = real[1] / f"{key}.safetensors"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("key", KEYS)
@fuzz_settings()
@given(data=st.data())
def test_byte_flips(real, key, data):
    original = real[0][SOURCE.get(key, key)][1]
    flips = data.draw(st.lists(st.tuples(st.integers(0, len(original) - 1), st.integers(1, 255)), min_size=1,
                               max_size=6))
    # half the examples aim at the 8-byte length and the header, where flips change the layout
    if data.draw(st.booleans()):
        header_end = 8 + struct.unpack("<Q", original[:8])[0]
        flips = [(pos % header_end, x) for pos, x in flips]
    mutated = bytearray(original)
    for pos, x in flips:
        mutated[pos] ^= x
    read_only_vmq_errors(LOADERS[key], _write(real, key, bytes(mutated)), len(mutated))


@pytest.mark.parametrize("key", KEYS)
@fuzz_settings()
@given(data=st.data())
def test_truncations(real, key, data):
    original = real[0][SOURCE.get(key, key)][1]
    cut = data.draw(st.integers(0, len(original) - 1))
    path = _write(real, key, original[:cut])
    with pytest.raises(VmqError):
        LOADERS[key](path)


@pytest.mark.parametrize("key", KEYS)
@fuzz_settings()
@given(data=st.data())
def test_headers_rewritten_with_random_json(real, key, data):
    original = real[0][SOURCE.get(key, key)][1]
    n = struct.unpack("<Q", original[:8])[0]
    header, payload = json.loads(original[8:8 + n]), original[8 + n:]
    how = data.draw(st.sampled_from(["whole", "entry", "field", "metadata", "length"]))
    names = sorted(k for k in header if k != "__metadata__")
    if how == "whole":
        header = data.draw(json_values)
    elif how == "entry":
        header[data.draw(st.sampled_from(names))] = data.draw(json_values)
    elif how == "field":
        entry = header[data.draw(st.sampled_from(names))]
        entry[data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(json_values)
    elif how == "metadata":
        header["__metadata__"] = data.draw(json_values)
    raw = json.dumps(header).encode()
    length = len(raw) if how != "length" else data.draw(st.integers(0, (1 << 64) - 1))
    mutated = struct.pack("<Q", length) + raw + payload
    read_only_vmq_errors(LOADERS[key], _write(real, key, mutated), len(mutated))


def _paths(obj, prefix=()):
    """Every key path of a JSON object (for choosing what to replace)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@pytest.mark.parametrize("key", ["packed", "vq"])
@fuzz_settings()
@given(data=st.data())
def test_random_packed_metadata(real, key, data):
    """Any value anywhere in the vmq metadata (the tensors and the checksum stay right)."""
    src = real[0][key][0]
    meta = json.loads(read_header(src).metadata["vmq"])
    paths = sorted(_paths(meta), key=repr)
    chosen = data.draw(st.sampled_from(paths))
    value = data.draw(json_values | st.integers(-(1 << 20), 1 << 20))

    def change(m):
        if not chosen:
            return value
        target = m
        for k in chosen[:-1]:
            target = target[k]
        target[chosen[-1]] = value
        return None

    path = rewrite_meta(src, real[1] / f"meta-{key}.safetensors", change)
    read_only_vmq_errors(load_packed, path, path.stat().st_size)
    read_only_vmq_errors(inspect_packed, path, path.stat().st_size)
