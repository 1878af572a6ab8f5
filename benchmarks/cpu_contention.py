"""How `vmq quantize` slows down when another busy process shares the CPUs: before and after, same run.

    python benchmarks/cpu_contention.py [--blocks 1] [--iterations 100] [--images 256] [--repeats 1] [--pin]
                                        [--passive] [--set KEY=VALUE ...] [--json]

Runs a short PTQ4VM W8A8 quantize of the reference model (``configs/w8a8.yaml`` restricted to
its first ``--blocks`` blocks, ``--iterations`` JLSS steps each) four ways, one at a time:

  * before, alone: the old defaults, i.e. every core's thread (``--threads os.cpu_count()``) and
    libgomp's default spin-waiting (``GOMP_SPINCOUNT=300000``);
  * before, under load: the same while one ``while True: pass`` process runs (``--pin``: pinned
    to the last CPU);
  * after, alone / under load: vmq's defaults (no ``--threads``, no OpenMP variables);
  * passive, alone / under load (with ``--passive``): vmq's threads, ``OMP_WAIT_POLICY=PASSIVE``
    (no spinning at all), to compare with the default's short spin.

Prints the seconds of the quantization itself (``quantize_seconds``; statistics pass and
start-up excluded), per block, and the slowdown under load (under load / alone) before and after.
Run it on an otherwise quiet machine: any other load makes both figures noise.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional

ROOT = Path(__file__).resolve().parents[1]
OMP_VARS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "MKL_NUM_THREADS")
TARGETS = r"re:layers\.({blocks})\.mixer\.(in_proj|x_proj|x_proj_b|dt_proj|dt_proj_b|out_proj)$"


def quantize_seconds(args, extra: List[str], env_extra: Dict[str, str], work: Path) -> float:
    blocks = "|".join(str(i) for i in range(args.blocks))
    cmd = [sys.executable, "-m", "vmq_cli.main", "quantize", "--recipe", str(ROOT / "configs" / "w8a8.yaml"),
           "--set", f"quantization.targets=['{TARGETS.format(blocks=blocks)}']",
           "--set", f"quantization.jlss.iterations={args.iterations}",
           "--set", f"calibration.num_images={args.images}",
           "--no-eval", "--out", str(work / "out.safetensors"), "--json", *extra]
    cmd += [a for s in args.overrides for a in ("--set", s)]
    env = {k: v for k, v in os.environ.items() if k not in OMP_VARS}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr}")
    return float(json.loads(proc.stdout)["quantize_seconds"])


def busy(pin: bool) -> subprocess.Popen:
    """One process spinning on a core (pinned to the last CPU with ``pin``)."""
    cpus = sorted(os.sched_getaffinity(0))
    pre = (lambda: os.sched_setaffinity(0, {cpus[-1]})) if pin else None
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pre)


def measure(args, extra: List[str], env_extra: Dict[str, str], work: Path, load: bool) -> float:
    spinner: Optional[subprocess.Popen] = busy(args.pin) if load else None
    try:
        return statistics.median(quantize_seconds(args, extra, env_extra, work) for _ in range(args.repeats))
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=1, help="blocks quantized (the first ones)")
    ap.add_argument("--iterations", type=int, default=100, help="JLSS steps per block (the recipe's default: 100)")
    ap.add_argument("--images", type=int, default=256, help="calibration images (the recipe's default: 256)")
    ap.add_argument("--repeats", type=int, default=1, help="runs per configuration (the median is reported)")
    ap.add_argument("--pin", action="store_true", help="pin the busy process to the last CPU")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="more recipe overrides, e.g. quantization.truncation.grid=10 for a quick check")
    ap.add_argument("--passive", action="store_true", help="also run with OMP_WAIT_POLICY=PASSIVE")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    configs = {
        "before": (["--threads", str(cores)], {"GOMP_SPINCOUNT": "300000"}),
        "after": ([], {}),
    }
    if args.passive:
        configs["passive"] = ([], {"OMP_WAIT_POLICY": "PASSIVE"})
    seconds = {}
    with tempfile.TemporaryDirectory(prefix="vmq_cpu_contention_") as tmp:
        for name, (extra, env_extra) in configs.items():
            for load in (False, True):
                label = f"{name}, {'under load' if load else 'alone'}"
                print(f"[cpu_contention] {label} ...", file=sys.stderr, flush=True)
                seconds[(name, load)] = measure(args, extra, env_extra, Path(tmp), load)
    rows = {name: {"alone_s": round(seconds[(name, False)], 2), "under_load_s": round(seconds[(name, True)], 2),
                   "per_block_alone_s": round(seconds[(name, False)] / args.blocks, 2),
                   "per_block_under_load_s": round(seconds[(name, True)] / args.blocks, 2),
                   "slowdown": round(seconds[(name, True)] / seconds[(name, False)], 2)} for name in configs}
    result = {"cpus": cores, "available_cpus": len(os.sched_getaffinity(0)), "blocks": args.blocks,
              "iterations": args.iterations, "images": args.images, "repeats": args.repeats,
              "busy_process": "pinned to the last CPU" if args.pin else "unpinned", **rows}
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"vmq quantize (PTQ4VM W8A8, reference model, {args.blocks} block(s), {args.iterations} JLSS steps, "
          f"{args.images} images), {cores} CPUs; load: one busy process ({result['busy_process']})")
    print(f"{'':8} {'alone s':>9} {'loaded s':>9} {'s/block':>8} {'loaded s/block':>15} {'slowdown':>9}")
    for name, r in rows.items():
        print(f"{name:8} {r['alone_s']:>9.1f} {r['under_load_s']:>9.1f} {r['per_block_alone_s']:>8.1f} "
              f"{r['per_block_under_load_s']:>15.1f} {r['slowdown']:>8.2f}x")
    print("before: --threads = all cores, GOMP_SPINCOUNT=300000 (libgomp's default); after: vmq's defaults"
          + ("; passive: vmq's threads, OMP_WAIT_POLICY=PASSIVE" if args.passive else ""))


if __name__ == "__main__":
    main()
