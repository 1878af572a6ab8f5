"""Safetensors files checked before they are read (checkpoints, calibration stats, packed files); the
packed format's version and payload SHA-256; `vmq inspect`."""

import json
import struct
import tracemalloc

import pytest
import torch
from safetensors.torch import save_file

from _packfiles import rewrite_meta, write_files
from conftest import run_vmq
from vmq.calib import CalibStats
from vmq.errors import VmqError
from vmq.models import read_state_dict
from vmq.pack.format import FORMAT_VERSION, is_packed, load_packed, read_metadata
from vmq.pack.inspect import inspect_packed
from vmq.safefile import read_header


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return write_files(tmp_path_factory.mktemp("files"))


def st_bytes(header, data=b"") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


F32_2 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
#: (id, file bytes, what the one error line says)
BAD_FILES = [
    ("empty-header-length", b"\x01\x02", "too short for a header"),
    ("claims-10-GiB", struct.pack("<Q", 10 << 30) + b"{}", "header claims 10,737,418,240 bytes"),
    ("claims-2^64-1", b"\xff" * 8 + b"{}", "header claims 18,446,744,073,709,551,615 bytes"),
    ("not-utf8", st_bytes(b"\xff\xfe{}"), "not UTF-8"),
    ("not-json", st_bytes(b"{not json at all"), "not JSON"),
    ("json-list", st_bytes([1, 2]), "a JSON list, not an object"),
    ("deep-nesting", st_bytes(b"[" * 100000 + b"]" * 100000), "nested too deeply"),
    ("huge-integer", st_bytes(b'{"a": ' + b"9" * 5000 + b"}"), "not JSON"),
    ("duplicate-key", st_bytes(b'{"a": 1, "a": 2}'), "appears twice"),
    ("metadata-not-strings", st_bytes({"__metadata__": {"k": 1}}), "__metadata__ must map strings to strings"),
    ("entry-not-object", st_bytes({"w": [1, 2]}), "must be an object with dtype, shape and data_offsets"),
    ("unknown-dtype", st_bytes({"w": dict(F32_2, dtype="F99")}, b"\0" * 8), "unknown dtype 'F99'"),
    ("negative-shape", st_bytes({"w": dict(F32_2, shape=[-2])}, b"\0" * 8), "not a list of non-negative integers"),
    ("float-shape", st_bytes({"w": dict(F32_2, shape=[2.0])}, b"\0" * 8), "not a list of non-negative integers"),
    ("reversed-offsets", st_bytes({"w": dict(F32_2, data_offsets=[8, 0])}, b"\0" * 8), "0 <= begin <= end"),
    ("shape-vs-offsets", st_bytes({"w": dict(F32_2, shape=[3])}, b"\0" * 8), "needs 12 bytes but its offsets span 8"),
    ("gigabyte-shape", st_bytes({"w": dict(F32_2, shape=[1 << 30, 1 << 30])}, b"\0" * 8),
     "needs 4,611,686,018,427,387,904 bytes"),
    ("overlap", st_bytes({"a": F32_2, "b": F32_2}, b"\0" * 16), "overlap"),
    ("gap", st_bytes({"a": dict(F32_2, data_offsets=[4, 12])}, b"\0" * 12), "4 bytes before tensor 'a'"),
    ("beyond-the-file", st_bytes({"w": dict(F32_2, shape=[4], data_offsets=[0, 16])}, b"\0" * 8),
     "ends at byte 16, past the 8-byte data section: truncated"),
    ("trailing-bytes", st_bytes({"w": F32_2}, b"\0" * 12), "4 bytes after the last tensor"),
]


@pytest.mark.parametrize("data,message", [b[1:] for b in BAD_FILES], ids=[b[0] for b in BAD_FILES])
def test_bad_safetensors_headers(tmp_path, data, message):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    for load, what in ((read_state_dict, "cannot read "), (CalibStats.load, "cannot read calibration stats "),
                       (load_packed, "cannot read packed file ")):
        with pytest.raises(VmqError) as err:
            load(path)
        assert str(err.value).startswith(f"{what}{path}: not a valid safetensors file (") and message in str(err.value)
        assert "\n" not in str(err.value)
    assert not is_packed(path) and read_metadata(path) is None


def test_header_claiming_gigabytes_allocates_nothing(tmp_path):
    path = tmp_path / "liar.safetensors"
    path.write_bytes(struct.pack("<Q", 10 << 30) + b"{}" + b" " * 64)
    tracemalloc.start()
    with pytest.raises(VmqError, match="header claims 10,737,418,240 bytes"):
        read_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 64 * 1024


def test_header_over_the_limit_is_refused_before_reading(tmp_path):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:  # a sparse file: 101 MiB on paper
        f.write(struct.pack("<Q", (100 << 20) + 1))
        f.truncate(101 << 20)
    tracemalloc.start()
    with pytest.raises(VmqError, match="over the 100 MiB limit"):
        read_header(path)
    assert tracemalloc.get_traced_memory()[1] < 64 * 1024
    tracemalloc.stop()


def test_truncated_real_files(files, tmp_path):
    for key, loader in (("checkpoint", read_state_dict), ("stats", CalibStats.load), ("packed", load_packed)):
        data = files[key].read_bytes()
        for cut in (4, 100, len(data) // 2, len(data) - 1):
            path = tmp_path / f"{key}-{cut}.safetensors"
            path.write_bytes(data[:cut])
            with pytest.raises(VmqError, match="not a valid safetensors file"):
                loader(path)


def test_stats_file_with_wrong_tensors(files, tmp_path):
    from safetensors import safe_open

    with safe_open(str(files["stats"]), framework="pt") as f:
        tensors, meta = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    name = sorted(tensors)[0].rsplit(".", 1)[0]
    for change, message in ((lambda t: t.pop(f"{name}.max"), f"tensor {name}.max is missing"),
                            (lambda t: t.__setitem__(f"{name}.sq_sum", torch.zeros(5)), "expected float"),
                            (lambda t: t.__setitem__(f"{name}.min", t[f"{name}.min"].to(torch.int32)), "I32")):
        changed = dict(tensors)
        change(changed)
        save_file(changed, str(tmp_path / "s.safetensors"), metadata=meta)
        with pytest.raises(VmqError, match=message):
            CalibStats.load(tmp_path / "s.safetensors")


def test_payload_checksum_is_recorded_and_verified(files):
    meta = read_metadata(files["packed"])
    assert meta["format_version"] == FORMAT_VERSION == "2.0" and len(meta["payload_sha256"]) == 64
    assert read_header(files["packed"]).payload_sha256() == meta["payload_sha256"]
    _, loaded = load_packed(files["packed"])
    assert loaded["payload_check"] == "verified"
    assert load_packed(files["packed"], verify=False)[1]["payload_check"] == "skipped"


def test_a_flipped_byte_anywhere_in_the_payload_is_caught(files, tmp_path):
    header = read_header(files["packed"])
    data = bytearray(files["packed"].read_bytes())
    start, size = header.data_start, len(data) - header.data_start
    positions = sorted({start + i * size // 300 for i in range(300)} | {start, len(data) - 1})
    path = tmp_path / "flipped.safetensors"
    for i, pos in enumerate(positions):
        data[pos] ^= 1 << (i % 8)
        path.write_bytes(data)
        assert inspect_packed(path)["checksum"] == "mismatch", pos
        if i % 30 == 0:  # loading refuses it too (before building the model)
            with pytest.raises(VmqError, match="payload checksum mismatch"):
                load_packed(path)
        data[pos] ^= 1 << (i % 8)


def test_format_versions(files, tmp_path):
    src = files["packed"]
    newer = rewrite_meta(src, tmp_path / "v3.safetensors",
                         lambda m: m.update(format_version="3.0", vmq_version="9.1.0"))
    with pytest.raises(VmqError, match=r"written by vmq 9\.1\.0, packed format version 3\.0; this vmq \(.*\) reads up "
                                       r"to 2\.x: upgrade vmq"):
        load_packed(newer)
    assert is_packed(newer)  # so that `vmq eval` says why rather than treating it as a checkpoint
    minor = rewrite_meta(src, tmp_path / "v2.7.safetensors", lambda m: m.update(format_version="2.7", extra={"k": 1}))
    assert load_packed(minor)[1]["payload_check"] == "verified"
    old = rewrite_meta(src, tmp_path / "v1.safetensors",
                       lambda m: [m.update(format_version=1), m.pop("payload_sha256")] and None)
    model, meta = load_packed(old)
    assert meta["payload_check"] == "absent" and inspect_packed(old)["checksum"] == "absent"
    for value in ("two", "2", 2, "2.0.1", None, True):
        bad = rewrite_meta(src, tmp_path / "bad.safetensors", lambda m: m.update(format_version=value))
        with pytest.raises(VmqError, match="not MAJOR.MINOR"):
            load_packed(bad)
    lacking = rewrite_meta(src, tmp_path / "nosum.safetensors", lambda m: m.pop("payload_sha256") and None)
    with pytest.raises(VmqError, match="needs payload_sha256, 64 hex digits"):
        load_packed(lacking)


def test_bad_metadata_is_refused_by_name(files, tmp_path):
    src = files["packed"]
    layer = "layers.0.mixer.in_proj"
    cases = [
        (lambda m: m["layers"][layer].update(kind="sparse"), f"layer {layer} has unknown kind 'sparse'"),
        (lambda m: "{broken", r"broken vmq metadata \(not a JSON object\)"),
        (lambda m: [1, 2], r"broken vmq metadata \(not a JSON object\)"),
        (lambda m: m.update(format="vmq.calibration"), "is a vmq calibration stats file"),
        (lambda m: m["model"].update(name="no_such_model"), "no_such_model"),
        (lambda m: m["model"]["config"].update(depth=10 ** 6), "depth=1000000 is out of range"),
        (lambda m: m["model"]["config"].update(embed_dim=2048), "describes a model of .* bytes in fp32, over 64 times"),
        (lambda m: m["model"]["config"].update(patch_size=0), "does not build test_vim"),
        (lambda m: m.pop("layers") and None, "broken vmq metadata"),
    ]
    for change, message in cases:
        path = rewrite_meta(src, tmp_path / "m.safetensors", change)
        with pytest.raises(VmqError, match=message):
            load_packed(path, verify=False)


def test_inspect_reads_without_building(files):
    info = inspect_packed(files["packed"])
    assert info["model"]["name"] == "test_vim" and info["method"] == "rtn" and info["scheme"] == "W4A8"
    assert info["checksum"] == "verified" and info["format_version"] == "2.0"
    layer = info["layers"]["layers.0.mixer.in_proj"]
    assert layer["scheme"] == "W4A8 per-channel" and layer["bits_per_weight"]["weights"] == 4.0
    n, k = layer["shape"]
    assert layer["bits_per_weight"]["scales"] == pytest.approx(32 / k, abs=1e-4)
    assert info["size"]["fp32_bytes"] > info["size"]["file_bytes"]
    import timm

    fp = timm.create_model("test_vim")  # the fp32 checkpoint of the same model
    assert info["size"]["fp32_bytes"] == 4 * sum(t.numel() for t in fp.state_dict().values())
    vq = inspect_packed(files["vq"], verify=False)
    assert vq["checksum"] == "skipped" and vq["method"] == "kmeans"
    layer = vq["layers"]["layers.0.mixer.in_proj"]
    bits = layer["bits_per_weight"]
    assert layer["scheme"].startswith("VQ d=2 K=4") and bits["codes"] == 1.0  # log2(4) bits per 2 weights
    assert bits["codebook"] > 0 and bits["total"] == pytest.approx(bits["codes"] + bits["codebook"] + bits["scales"])


def one_error_line(proc, rc=1):
    assert proc.returncode == rc, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_cli_inspect(files, tmp_path):
    proc = run_vmq("inspect", files["vq"], "--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)  # stdout is the JSON alone
    assert info["checksum"] == "verified" and info["model"]["family"] == "vim" and info["layers"]
    proc = run_vmq("inspect", files["packed"])
    assert proc.returncode == 0 and "W4A8 per-channel" in proc.stdout and "verified" in proc.stdout
    data = bytearray(files["packed"].read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "bad.safetensors").write_bytes(data)
    proc = run_vmq("inspect", tmp_path / "bad.safetensors", "--json")
    assert json.loads(proc.stdout)["checksum"] == "mismatch"
    assert "payload checksum mismatch" in one_error_line(proc)
    proc = run_vmq("inspect", tmp_path / "bad.safetensors", "--no-verify", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["checksum"] == "skipped"
    torch.save({"w": torch.zeros(2)}, tmp_path / "model.pth")
    for path, message in ((files["checkpoint"], "without vmq metadata (a floating-point checkpoint?), not a vmq "
                                                "packed file"),
                          (files["stats"], "is a vmq calibration stats file"),
                          (tmp_path / "model.pth", "is a PyTorch checkpoint (.pth), not a vmq packed file"),
                          (tmp_path / "nope.safetensors", "packed file not found")):
        line = one_error_line(run_vmq("inspect", path, "--json"))
        assert message in line and str(path) in line


def test_cli_eval_verifies_unless_told_not_to(files, tmp_path):
    data = bytearray(files["packed"].read_bytes())
    data[-10] ^= 0x01  # the last bytes: a tensor's value, not its layout
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(data)
    assert "payload checksum mismatch" in one_error_line(run_vmq("eval", bad, "--limit", "8", "--json"))
    proc = run_vmq("eval", bad, "--limit", "8", "--json", "--no-verify")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["packed"]["checksum"] == "skipped"
    proc = run_vmq("eval", files["packed"], "--limit", "8", "--json")
    assert proc.returncode == 0 and json.loads(proc.stdout)["packed"]["checksum"] == "verified"
