"""Property-based fuzzing of ``.pth`` checkpoint reading: valid files (zip and legacy format) with
bytes flipped, overwritten, inserted or cut off. Reading one either gives a state dict no bigger
than a small multiple of the file, or raises VmqError; nothing else escapes.

``VMQ_FUZZ_EXAMPLES`` scales the run (see tests/test_fuzz_recipe.py).
"""

import io
import os
import tempfile
import warnings
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmq.errors import VmqError
from vmq.models.checkpoint import read_state_dict
from vmq.models.pth import MAX_VIEW_FACTOR

EXAMPLES = int(os.environ.get("VMQ_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _valid(legacy: bool) -> bytes:
    sd = {"model": {"blocks.0.weight": torch.arange(24, dtype=torch.float16).reshape(4, 6),
                    "blocks.0.bias": torch.ones(4), "steps": torch.tensor(3)}}
    buf = io.BytesIO()
    torch.save(sd, buf, _use_new_zipfile_serialization=not legacy)
    return buf.getvalue()


BASES = {False: _valid(False), True: _valid(True)}

edit = st.one_of(
    st.tuples(st.just("cut"), st.floats(0, 1), st.binary(max_size=0)),
    st.tuples(st.just("flip"), st.floats(0, 1), st.binary(min_size=1, max_size=1)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    # a little-endian 64-bit size put where a size may be (storage numel in legacy headers, zip sizes)
    st.tuples(st.just("overwrite"), st.floats(0, 1),
              st.integers(0, 2 ** 63 - 1).map(lambda n: n.to_bytes(8, "little"))),
)


def _apply(data: bytes, op: str, where: float, payload: bytes) -> bytes:
    if not data:
        return payload if op in ("overwrite", "insert") else data
    i = min(int(where * len(data)), len(data) - 1)
    if op == "cut":
        return data[:i]
    if op == "flip":
        return data[:i] + bytes([data[i] ^ (payload[0] or 1)]) + data[i + 1:]
    if op == "overwrite":
        return data[:i] + payload + data[i + len(payload):]
    return data[:i] + payload + data[i:]


@FUZZ
@given(legacy=st.booleans(), edits=st.lists(edit, min_size=1, max_size=3))
def test_mangled_pth_raises_only_vmq_errors(legacy, edits):
    data = BASES[legacy]
    for op, where, payload in edits:
        data = _apply(data, op, where, payload)
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "mangled.pth"
        p.write_bytes(data)
        with warnings.catch_warnings(record=True) as caught:  # a warning would be a second line on stderr
            warnings.simplefilter("always")
            try:
                sd = read_state_dict(p)
            except VmqError:
                sd = None
        assert not caught, [str(w.message) for w in caught]
        if sd is None:
            return
        loaded = sum(t.numel() * t.element_size() for t in sd.values())
        # fp16 becomes fp32 (x2) over at most MAX_VIEW_FACTOR times the file's bytes
        assert loaded <= 2 * MAX_VIEW_FACTOR * max(len(data), 1), (loaded, len(data))


def test_unmangled_bases_load():
    with tempfile.TemporaryDirectory() as d:
        for legacy, data in BASES.items():
            p = Path(d) / f"ok{legacy}.pth"
            p.write_bytes(data)
            sd = read_state_dict(p)
            assert sd["blocks.0.weight"].dtype == torch.float32 and sd["steps"].item() == 3
