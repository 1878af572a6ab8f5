"""Streaming evaluation of folders: workers, order-independent per-image results, unreadable images and folders."""

import json
import os

import numpy as np
import pytest
import timm
import torch
from PIL import Image

import vmq.data
import vmq.models  # noqa: F401
from vmq.data import eval_loader, shipped_eval_set
from vmq.errors import VmqError
from vmq.evaluate import evaluate
from tests.conftest import run_vmq


def _write_folder(root, indices):
    ds = shipped_eval_set()
    for i in indices:
        cls = ds.class_names[ds.labels[i]]
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(ds.images[i]).save(root / cls / f"{i:04d}.png")
    return root


def _model():
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return timm.create_model("test_vim").eval()


def _by_file(loader, res):
    names = [loader.dataset.filename(int(i)) for i in res["indices"]]
    return dict(zip(names, res["predictions"].tolist()))


def test_predictions_do_not_depend_on_batching_workers_or_the_rest_of_the_set(tmp_path):
    model = _model()
    full = _write_folder(tmp_path / "full", range(40))
    subset = _write_folder(tmp_path / "subset", [1, 2, 3, 7, 11, 12, 20, 29, 33, 39])
    loader, _, _ = eval_loader(model, full, batch_size=16, workers=2)
    res = evaluate(model, loader, keep_predictions=True)
    assert res["num_images"] == 40 and res["indices"].tolist() == list(range(40))  # in the set's order
    again, _, _ = eval_loader(model, full, batch_size=7, workers=0)
    assert torch.equal(evaluate(model, again, keep_predictions=True)["predictions"], res["predictions"])
    sub_loader, _, _ = eval_loader(model, subset, batch_size=3, workers=1)
    sub = evaluate(model, sub_loader, keep_predictions=True)
    whole, part = _by_file(loader, res), _by_file(sub_loader, sub)
    assert len(part) == 10 and all(whole[name] == pred for name, pred in part.items())
    # the subset's top-1 is what the full run's predictions give on those images
    labels = {loader.dataset.filename(i): loader.dataset.base.reader.samples[i][1] for i in range(40)}
    hits = sum(whole[name] == labels[name] for name in part)
    assert sub["top1"] == pytest.approx(100.0 * hits / 10)


def _with_bad_images(root):
    _write_folder(root, range(12))
    cat = root / "cat"
    cat.mkdir(exist_ok=True)
    (cat / "0000x_garbage.png").write_bytes(b"this is not a png")
    (cat / "0000y_empty.png").write_bytes(b"")
    return root


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_images_stop_or_are_skipped_and_counted(tmp_path, workers):
    model = _model()
    root = _with_bad_images(tmp_path / "data")
    loader, _, _ = eval_loader(model, root, batch_size=4, workers=workers)
    with pytest.raises(VmqError, match=r"cannot read image .*cat/0000x_garbage.png: .*--skip-bad"):
        evaluate(model, loader)
    res = evaluate(model, loader, skip_bad=True)  # the persistent workers serve a second pass
    assert res["num_images"] == 12 and res["skipped_images"] == 2
    assert any("0000y_empty.png: empty file (0 bytes)" in e for e in res["skipped_errors"])


def test_folder_of_empty_files(tmp_path):
    model = _model()
    (tmp_path / "cat").mkdir()
    for i in range(5):
        (tmp_path / "cat" / f"{i}.jpg").write_bytes(b"")
    loader, _, _ = eval_loader(model, tmp_path, batch_size=2, workers=0)
    with pytest.raises(VmqError, match=r"0.jpg: empty file \(0 bytes\)"):
        evaluate(model, loader)
    with pytest.raises(VmqError, match="none of the 5 images of the evaluation set could be read"):
        evaluate(model, loader, skip_bad=True)


def test_unreadable_folder_is_named(tmp_path, monkeypatch):
    root = _write_folder(tmp_path / "data", range(4))
    locked = root / "cat"
    real = os.access
    monkeypatch.setattr(vmq.data.os, "access", lambda p, mode: False if str(p) == str(locked) else real(p, mode))
    with pytest.raises(VmqError, match=f"cannot read data folder {locked}: permission denied"):
        eval_loader(_model(), root)
    monkeypatch.setattr(vmq.data.os, "access", lambda p, mode: False if str(p) == str(root) else real(p, mode))
    with pytest.raises(VmqError, match=f"cannot read data folder {root}: permission denied"):
        eval_loader(_model(), root)


def _one_line_error(r, match):
    assert r.returncode == 1, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert match in lines[0], lines[0]
    assert r.stdout == ""


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_cli_unreadable_folder(tmp_path):
    root = _write_folder(tmp_path / "data", range(4))
    os.chmod(root, 0)
    try:
        _one_line_error(run_vmq("eval", "--model", "test_vim", "--checkpoint", "random", "--data", root),
                        "cannot read data folder")
    finally:
        os.chmod(root, 0o755)


def test_cli_stops_naming_the_file_or_skips_with_a_count(tmp_path):
    root = _with_bad_images(tmp_path / "data")
    base = ("eval", "--model", "test_vim", "--checkpoint", "random", "--data", root, "--batch-size", "4")
    _one_line_error(run_vmq(*base), "cannot read image")
    r = run_vmq(*base, "--skip-bad", "--workers", "2", "--threads", "1", "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["num_images"] == 12 and res["skipped_images"] == 2 and res["workers"] == 2 and res["threads"] == 1
    assert "skipped 2 image(s)" in r.stderr
    r = run_vmq(*base, "--skip-bad", "--workers", "0")  # the table says it too
    assert r.returncode == 0 and "skipped (unreadable)" in r.stdout, r.stderr


def test_cli_folder_of_empty_files(tmp_path):
    (tmp_path / "cat").mkdir()
    for i in range(3):
        (tmp_path / "cat" / f"{i}.png").write_bytes(b"")
    base = ("eval", "--model", "test_vim", "--checkpoint", "random", "--data", tmp_path, "--workers", "0")
    _one_line_error(run_vmq(*base), "empty file (0 bytes)")
    _one_line_error(run_vmq(*base, "--skip-bad"), "none of the 3 images")


def test_progress_with_a_unit_shows_rate_and_time_left(capsys):
    from vmq_cli import _console

    with _console.progress("evaluating", 100, every_s=0.0, unit="images") as update:
        update(50)
    line = capsys.readouterr().err.strip()
    assert line.startswith("evaluating: 50/100 images (") and "images/s" in line and "s left)" in line


def test_shipped_set_reads_in_the_main_process_by_default():
    loader, _, _ = eval_loader(_model(), None, limit=8)
    assert loader.num_workers == 0
    assert isinstance(next(iter(loader)), vmq.data.EvalBatch)
    np.testing.assert_array_equal(loader.dataset.indices, vmq.data._evenly_spaced(1017, 8))
