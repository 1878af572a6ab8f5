"""torch.distributed: the reductions, sharded eval, calibration and quantize, two gloo processes on the CPU.

The end-to-end tests start ``torchrun`` (``python -m torch.distributed.run --standalone``) with two
processes on the reference model and compare with one process.
"""

import json
import os
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

ENV = {"OMP_NUM_THREADS": "1"}  # torchrun's default per process; the same for the one-process runs
#: top-1 agreement (%) of a short W4A8 PTQ4VM on two processes with one process, on the shipped test
#: set: JLSS turns summation-order noise into other step sizes (AdamW's first steps move by about
#: lr whatever the gradient's size); one process summing each batch in two halves agrees 97.8 %
#: (benchmarks/distributed.py --quick; two processes: 98.4 %)
JLSS_AGREEMENT = 95.0


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

    assert Part.of(Dist(1, 2), 32, 16) == Part(Dist(1, 2), 16, 32, 32)
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
        # gradients: summed; a parameter no process has a gradient for keeps none
        a, b, c = (nn.Parameter(torch.zeros(2)) for _ in range(3))
        a.grad = torch.full((2,), rank + 1.0)
        b.grad = torch.ones(2) if rank == 1 else None
        dist.sum_grads([a, b, c])
        assert a.grad.tolist() == [3.0, 3.0] and b.grad.tolist() == [1.0, 1.0] and c.grad is None
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
    """Three JLSS-like steps (SGD, so that rounding noise stays small) on a W4A8 fake-quant layer;
    the learnt weight and activation step sizes. ``part``: this process's shard (None: one process)."""
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
    params = [q.w_quant.scale, q.a_quant.scale]
    start = [p.detach().clone() for p in params]
    local = slice(None) if part is None else slice(part.start, part.stop)
    with BlockTrainer(_Family(), nn.Sequential(q), (x[local],), target[local], LOSSES["mse"], 8, 0, params, part,
                      lambda share: _whole_batch_lsq([q.a_quant.scale], share)) as trainer:
        opt = torch.optim.SGD(params, lr=1e-3)
        for _ in range(3):
            trainer.step(opt, grad_clip=1.0)
    learnt = [p.detach().clone() for p in params]
    assert not any(torch.equal(a, b) for a, b in zip(start, learnt))  # both step sizes moved
    return learnt


def _trainer(rank: int, world: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    with launch("cpu") as (dist, _):
        one = _trained_step_sizes(None)
        two = _trained_step_sizes(Part.of(dist, 12, 4))  # rank 0 holds samples 0-7, rank 1 8-11
        for a, b in zip(one, two):
            torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-8)


def test_block_trainer_on_two_processes_takes_one_process_steps():
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
    from vmq.data import eval_loader
    from vmq.pack.format import load_packed

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

    # a short W4A8 PTQ4VM (JLSS: gradients summed over the processes): rank 0 alone writes; the two
    # packed models agree up to what floating-point summation order does to JLSS (see the README)
    q = ["quantize", "--recipe", recipe, *[x for s in sets + ["quantization.jlss.iterations=5", "eval.limit=64"]
                                          for x in ("--set", s)], "--json"]
    (tmp_path / "q1").mkdir()
    (tmp_path / "q2").mkdir()
    one = run_vmq(*q, "--out", tmp_path / "q1" / "m.safetensors", env=ENV)
    two = torchrun(*q, "--out", tmp_path / "q2" / "m.safetensors")
    assert one.returncode == 0, one.stderr
    assert two.returncode == 0, two.stderr[-3000:]
    r1, r2 = json.loads(one.stdout), json.loads(two.stdout)  # one JSON document: rank 0 alone prints
    assert (r1["fp_top1"], r1["fp_top5"], r1["eval_images"]) == (r2["fp_top1"], r2["fp_top5"], r2["eval_images"])
    assert r2["eval_images"] == 64 and r2["calibration_images"] == 32
    assert sorted(p.name for p in (tmp_path / "q2").iterdir()) == ["m.recipe.yaml", "m.safetensors"]
    logits = []
    for path in (tmp_path / "q1" / "m.safetensors", tmp_path / "q2" / "m.safetensors"):
        model, _ = load_packed(path)
        loader, _, _ = eval_loader(model, None, 128)
        logits.append(evaluate(model, loader, keep_logits=True)["logits"])
    assert agreement(logits[0], logits[1])["top1_agreement"] >= JLSS_AGREEMENT
