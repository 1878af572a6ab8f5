"""torch.distributed: the reductions, sharded eval, calibration and quantize, two gloo processes on the CPU.

The end-to-end tests start ``torchrun`` (``python -m torch.distributed.run --standalone``) with two
processes on the reference model and compare with one process.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import ROOT, run_vmq
from vmq.distributed import Dist, Part, launch, shard_loader
from vmq.evaluate import evaluate
from vmq.metrics import agreement
from vmq.progress import images_sha256, progress_path_for

ENV = {"OMP_NUM_THREADS": "1"}  # torchrun's default per process; the same for the one-process runs


def torchrun(*args, nproc=2):
    """``vmq ARGS`` under torchrun with ``nproc`` gloo processes on this machine."""
    e = dict(os.environ, **ENV)
    e.pop("VMQ_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
                           "-m", "vmq_cli.main", *map(str, args)], capture_output=True, text=True, env=e, timeout=900)


def test_batch_shards_cover_the_items_once_in_order():
    for world in (1, 2, 3, 8):
        for batch in (1, 3, 8):
            for n in range(0, 40):
                parts = [Dist(r, world).batch_shard(n, batch) for r in range(world)]
                assert [i for s in parts for i in range(n)[s]] == list(range(n))
                assert all(s.start % batch == 0 for s in parts if s.stop > s.start)  # whole batches: a one-process run's batches
                sizes = [s.stop - s.start for s in parts]
                assert sizes == sorted(sizes, reverse=True)  # rank 0 is never the one left without work


def test_a_shard_per_process_is_required_for_calibration():
    from vmq.errors import VmqError

    assert Part.of(Dist(1, 2), 32, 16) == Part(Dist(1, 2), 16, 32, 32, 16)
    with pytest.raises(VmqError, match="fewer than the 2 processes"):
        Part.of(Dist(0, 2), 32, 32)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _primitives(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with launch("cpu") as (dist, device):
        assert (dist.rank, dist.world, device) == (rank, world, "cpu")
        assert dist.sum(torch.tensor([rank, 1])).tolist() == [1, 2]
        assert dist.min(torch.tensor([rank + 0.5])).item() == 0.5 and dist.max(torch.tensor([rank])).item() == 1
        assert dist.all_true(rank == 0) is False and dist.all_true(True) is True
        # variable lengths, and a rank with nothing
        mine = torch.full((3 - 2 * rank, 2), float(rank))
        assert dist.gather_cat(mine)[:, 0].tolist() == [0, 0, 0, 1]
        assert dist.gather_cat(mine if rank == 0 else None).shape == (3, 2)
        assert dist.gather_cat(torch.tensor([True, rank == 1])).tolist() == [True, False, True, True]
        # what rank 0 alone knows, on every rank
        assert dist.check_on_main(lambda: "rank 0's") == ("rank 0's" if rank == 0 else None)
        assert dist.broadcast_int(41 + rank) == 41
        blob = bytes(range(256)) * 3 + b"tail"
        assert dist.broadcast_bytes(blob if rank == 0 else None) == blob
        assert dist.broadcast_bytes(b"" if rank == 0 else None) == b""
        # the calibration set's sha256 (progress identity) from shards of whole batches: one process's
        images = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(7))
        part = Part.of(dist, 5, 2)  # rank 0: images 0-3, rank 1: image 4
        assert images_sha256(images[part.start:part.stop], 2, dist) == images_sha256(images, 2)
        assert images_sha256(images[part.start:part.stop], 2, dist) != images_sha256(images.flip(0), 2)
        # evaluation: 5 items in batches of 4 (rank 1 holds the last one) and in batches of 8 (rank 1 holds none)
        torch.manual_seed(0)
        model = nn.Linear(6, 7)
        model.num_classes = 7
        data = TensorDataset(torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 4]))
        for batch in (4, 8):
            loader = DataLoader(data, batch_size=batch)
            whole = evaluate(model, loader, keep_logits=True)
            shard = evaluate(model, shard_loader(loader, dist), keep_logits=True, dist=dist)
            for k in ("top1", "top5", "num_images"):
                assert shard[k] == whole[k], (k, batch)
            noisy = shard["logits"] + 0.3 * torch.randn(shard["logits"].shape, generator=torch.Generator().manual_seed(rank))
            over_shards = agreement(shard["logits"], noisy, dist)
            over_all = agreement(whole["logits"], dist.gather_cat(noisy))
            assert over_shards["top1_agreement"] == over_all["top1_agreement"]
            assert over_shards["logit_snr_db"] == pytest.approx(over_all["logit_snr_db"], abs=1e-3)


class _Family:
    """What BlockTrainer needs of a model family, for a block that is one layer."""

    def run_block(self, block, io):
        return (block(io[0]),)

    def block_output(self, io):
        return io[0]


def _trained_step_sizes(part):
    """Three JLSS steps (AdamW) on a W4A8 fake-quant layer and a weight no sample reaches; the
    learnt weight and activation step sizes. ``part``: this process's shard of the 12 samples."""
    from vmq.optimise import LOSSES, BlockTrainer
    from vmq.quant.jlss import _whole_batch_lsq
    from vmq.quant.qlinear import QuantLinear

    gen = torch.Generator().manual_seed(0)
    x, target = torch.randn(12, 5, 8, generator=gen), torch.randn(12, 5, 6, generator=gen)
    lin = nn.Linear(8, 6)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(6, 8, generator=gen))
        lin.bias.copy_(torch.randn(6, generator=gen))
    q = QuantLinear(lin, 4, 8, "token_static", 5)
    with torch.no_grad():
        q.w_quant.scale.copy_(q.weight.abs().amax(1, keepdim=True).reshape(q.w_quant.scale.shape) / 7)
    q.a_quant.set_range(x.amin(dim=(0, 2)), x.amax(dim=(0, 2)))
    q.train()
    unused = nn.Parameter(torch.ones(3))  # no gradient on any process: keeps none, the optimiser skips it
    params = [q.w_quant.scale, q.a_quant.scale, unused]
    start = [p.detach().clone() for p in params]
    local = slice(part.start, part.stop)
    with BlockTrainer(_Family(), nn.Sequential(q), (x[local],), target[local], LOSSES["mse"], 8, 0, params, part,
                      lambda share: _whole_batch_lsq([q.a_quant.scale], share)) as trainer:
        opt = torch.optim.AdamW(params, lr=1e-3)
        for _ in range(3):
            trainer.step(opt, grad_clip=1.0)
    learnt = [p.detach().clone() for p in params]
    assert not any(torch.equal(a, b) for a, b in zip(start[:2], learnt[:2]))  # both step sizes moved
    assert torch.equal(learnt[2], start[2]) and unused.grad is None
    return learnt


def _trainer(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with launch("cpu") as (dist, _):
        one = _trained_step_sizes(Part.whole(12, 4))
        two = _trained_step_sizes(Part.of(dist, 12, 4))  # rank 0 holds samples 0-7, rank 1 8-11
        for a, b in zip(one, two):  # units of 4 samples, float64 sums: the same bits
            assert torch.equal(a, b)


def test_block_trainer_on_two_processes_takes_one_process_steps_exactly():
    torch.multiprocessing.spawn(_trainer, args=(2, _free_port()), nprocs=2, join=True)


def test_reductions_and_sharded_evaluate_on_two_processes():
    torch.multiprocessing.spawn(_primitives, args=(2, _free_port()), nprocs=2, join=True)


def test_eval_on_two_processes_equals_one(tmp_path):
    args = ["eval", "--limit", "200", "--batch-size", "32", "--json"]
    one, two = run_vmq(*args, env=ENV), torchrun(*args)
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 alone prints: one JSON document
    for k in ("top1", "top1_err", "top5", "top5_err", "num_images", "param_count"):
        assert a[k] == b[k], k
    assert a["num_images"] == 200


def test_calibrate_and_quantize_on_two_processes_follow_one(tmp_path):
    from vmq.calib import CalibStats

    # calibration statistics: minima, maxima and counts exact, float64 second moments to rounding
    cal = ["calibrate", "--num-images", "32", "--batch-size", "8", "--json"]
    one = run_vmq(*cal, "--out", tmp_path / "one.safetensors", env=ENV)
    two = torchrun(*cal, "--out", tmp_path / "two.safetensors")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    assert json.loads(two.stdout)["num_images"] == 32
    s1, s2 = CalibStats.load(tmp_path / "one.safetensors"), CalibStats.load(tmp_path / "two.safetensors")
    assert s1.meta == s2.meta and list(s1.layers) == list(s2.layers)
    for name, a in s1.layers.items():
        b = s2.layers[name]
        assert torch.equal(a.min, b.min) and torch.equal(a.max, b.max) and a.count == b.count, name
        torch.testing.assert_close(a.sq_sum, b.sq_sum, rtol=1e-12, atol=0)

    # W4A8 PTS (no learning: statistics, truncation search on gathered inputs, SNR): the very same bytes
    sets = ["calibration.num_images=32", "calibration.batch_size=8", "quantization.truncation.num_images=16"]
    recipe = ROOT / "configs" / "w4a8.yaml"
    pts = ["quantize", "--recipe", recipe, *[x for s in sets + ["quantization.method=pts"] for x in ("--set", s)],
           "--no-eval", "--json"]
    one = run_vmq(*pts, "--out", tmp_path / "pts1.safetensors", env=ENV)
    two = torchrun(*pts, "--out", tmp_path / "pts2.safetensors")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    assert (tmp_path / "pts1.safetensors").read_bytes() == (tmp_path / "pts2.safetensors").read_bytes()

    # a short W4A8 PTQ4VM (JLSS: gradients of each calibration batch's share, summed in batch order
    # over the processes): rank 0 alone writes, the same bytes as one process
    q = ["quantize", "--recipe", recipe, *[x for s in sets + ["quantization.jlss.iterations=5", "eval.limit=64"]
                                          for x in ("--set", s)], "--json"]
    (tmp_path / "q1").mkdir()
    (tmp_path / "q2").mkdir()
    one = run_vmq(*q, "--out", tmp_path / "q1" / "m.safetensors", env=ENV)
    two = torchrun(*q, "--out", tmp_path / "q2" / "m.safetensors")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)  # one JSON document: rank 0 alone prints
    for k in ("fp_top1", "fp_top5", "quant_top1", "quant_top5", "top1_agreement", "eval_images"):
        assert r1[k] == r2[k], k
    assert r1["logit_snr_db"] == pytest.approx(r2["logit_snr_db"], abs=1e-3)  # float64 sums, added per process
    assert r2["eval_images"] == 64 and r2["calibration_images"] == 32
    assert sorted(p.name for p in (tmp_path / "q2").iterdir()) == ["m.recipe.yaml", "m.safetensors"]
    assert (tmp_path / "q1" / "m.safetensors").read_bytes() == (tmp_path / "q2" / "m.safetensors").read_bytes()


def test_vq_search_on_three_processes_writes_one_process_bytes(tmp_path):
    # 32 images in batches of 8 over 3 processes: 2, 1 and 1 batches
    vq = ["vq", "--recipe", ROOT / "configs" / "vq-2bit.yaml", "--no-eval",
          *[x for s in ("calibration.num_images=32", "calibration.batch_size=8", "vq.search.iterations=6")
            for x in ("--set", s)]]
    one = run_vmq(*vq, "--out", tmp_path / "one.safetensors", env=ENV)
    three = torchrun(*vq, "--out", tmp_path / "three.safetensors", nproc=3)
    assert one.returncode == 0, one.stderr
    assert three.returncode == 0, three.stderr[-3000:]
    assert (tmp_path / "one.safetensors").read_bytes() == (tmp_path / "three.safetensors").read_bytes()


# a `vmq quantize` under torchrun whose every process SIGKILLs itself once the second block is
# recorded (the progress is on rank 0's disk then): a test-only wrapper, vmq has no kill switch
KILLING_DRIVER = """
import os, signal, sys
from vmq.progress import ProgressStore
save = ProgressStore.save_block
def save_then_die(self, index, tensors, meta):
    save(self, index, tensors, meta)
    if index == 1:
        os.kill(os.getpid(), signal.SIGKILL)
ProgressStore.save_block = save_then_die
import vmq_cli.main
vmq_cli.main.main(sys.argv[1:])
"""


def test_quantize_killed_under_torchrun_resumes_with_two_processes_or_one(tmp_path):
    q = ["quantize", "--recipe", ROOT / "configs" / "w4a8.yaml", "--no-eval",
         *[x for s in ("calibration.num_images=32", "calibration.batch_size=8", "quantization.jlss.iterations=3",
                       "quantization.truncation.num_images=16") for x in ("--set", s)]]
    whole = tmp_path / "whole" / "m.safetensors"
    whole.parent.mkdir()
    one = run_vmq(*q, "--out", whole, env=ENV)
    assert one.returncode == 0, one.stderr

    driver = tmp_path / "driver.py"
    driver.write_text(KILLING_DRIVER)
    killed = tmp_path / "killed" / "m.safetensors"
    killed.parent.mkdir()
    e = dict(os.environ, **ENV)
    e.pop("VMQ_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(driver), *map(str, q), "--out", str(killed)], capture_output=True, text=True, env=e,
                          timeout=900)
    assert proc.returncode != 0
    progress = progress_path_for(killed)
    assert sorted(p.name for p in progress.iterdir()) == ["block-0000.safetensors", "block-0001.safetensors", "run.json"]
    assert not killed.exists()

    for nproc in (2, 1):  # the same progress, resumed by two processes and by one
        out = tmp_path / f"resumed{nproc}" / "m.safetensors"
        out.parent.mkdir()
        shutil.copytree(progress, progress_path_for(out))
        resumed = torchrun(*q, "--out", out, "--resume", nproc=nproc) if nproc > 1 else \
            run_vmq(*q, "--out", out, "--resume", env=ENV)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert out.read_bytes() == whole.read_bytes(), nproc
        assert sorted(p.name for p in out.parent.iterdir()) == ["m.recipe.yaml", "m.safetensors"]  # progress removed
