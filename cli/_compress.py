"""What ``vmq quantize`` and ``vmq vq`` share: options, the call to ``vmq.compress``, the output."""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

import click

from vmq_cli._options import memory_options, threads_option


resume_option = click.option(
    "--resume", is_flag=True,
    help="Continue an interrupted run from the per-block progress kept beside the output (<out>.progress/); "
         "refused when that was made with another recipe, model or calibration set. Under torchrun, rank 0 keeps it, and "
         "any number of processes may resume it.")


def compress_options(recipe_help: str, set_example: str, out_pattern: str) -> Callable:
    """The options ``vmq quantize`` and ``vmq vq`` share (recipe, overrides, output, stats, device, eval, JSON,
    memory budget)."""
    options = [
        click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None, help=recipe_help),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help=f"Override a recipe key, e.g. --set {set_example} (repeatable)."),
        click.option("--out", type=click.Path(dir_okay=False), default=None,
                     help=f"Packed file to write; default: {out_pattern}. The resolved recipe is written beside it "
                          "as <name>.recipe.yaml."),
        click.option("--stats", "stats_path", type=click.Path(dir_okay=False), default=None,
                     help="Calibration stats from `vmq calibrate` for this model (skips the statistics pass)."),
        click.option("--device", default=None, metavar="cpu|cuda[:N]",
                     help="Where calibration and compression run (default: the recipe's `device`, cpu)."),
        click.option("--no-eval", is_flag=True, help="Skip the floating-point and quantized evaluation."),
        threads_option,
        resume_option,
        click.option("--json", "as_json", is_flag=True, help="Print results as JSON."),
    ]

    def decorate(f: Callable) -> Callable:
        f = memory_options(f)
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def run(kind: str, recipe_path: Optional[str], overrides: Tuple[str, ...], out: Optional[str],
        stats_path: Optional[str], device: Optional[str], no_eval: bool,
        default_out: Callable[[str, Any], str], max_memory: Optional[str] = None,
        offload_dir: Optional[str] = None, resume: bool = False) -> Tuple[Any, Optional[Dict[str, Any]]]:
    """Check everything that can fail before the work, compress, write; returns (result, results dict).

    Under torchrun each process compresses on its shard of the images (:mod:`vmq.distributed`);
    rank 0 alone checks and writes the output and gets the results dict, the others None. One
    process keeps per-block progress beside the output (``<out>.progress/``) for ``--resume``."""
    from vmq.calib import CalibStats
    from vmq.compress.api import compress, load_model, read_recipe, recipe_path_for, resolve_device
    from vmq.compress.methods import method_for
    from vmq.distributed import launch
    from vmq.fileio import check_output_path
    from vmq.progress import progress_path_for, refuse_unasked
    from vmq_cli import _console as console
    from vmq_cli._options import check_memory

    recipe = read_recipe(recipe_path, overrides, kind=kind)
    method = method_for(kind, getattr(recipe, kind), str(recipe_path or "recipe"))
    with launch(device or recipe.device) as (dist, device):
        budget = check_memory(max_memory, offload_dir, resolve_device(device, recipe))
        model = load_model(recipe.model.name, recipe.model.checkpoint)
        out = out or default_out(model.vmq_name, method)
        progress_dir = progress_path_for(out)
        dist.check_on_main(lambda: (check_output_path(out), check_output_path(recipe_path_for(out)),
                                    refuse_unasked(progress_dir, resume)))
        stats = CalibStats.load(stats_path) if stats_path is not None else None
        result = compress(recipe, model=model, stats=stats, evaluate_model=not no_eval, progress=console.progress,
                          max_memory=budget.max_bytes, offload_dir=budget.offload_dir, dist=dist,
                          progress_dir=progress_dir, resume=resume)
    if not dist.is_main:
        return result, None
    results = result.results()
    for warning in results["warnings"]:
        console.warn(warning)
    results.update(result.save(out))
    results["total_seconds"] = round(result.timings["total_seconds"], 2)
    results[method.timing_key] = round(result.seconds, 2)
    results["layers"] = [r.to_dict() for r in result.reports]
    results["activations"] = result.activations
    return result, results


def layer_cells(names: List[str], prefixes: List[str]) -> Dict[str, Tuple[str, Callable[[str], str]]]:
    """Per layer name: (block index, a function shortening names inside that block), for tables.

    Names lose the block prefix and the module path all the block's listed layers share
    (block ``3`` with prefix ``B.3.``: ``B.3.mix.proj`` -> ``proj`` when every listed layer is under
    ``B.3.mix.``; ``B.3.norm`` -> ``norm``)."""
    def block_of(name: str) -> int:
        return next((k for k, p in enumerate(prefixes) if name.startswith(p)), -1)

    cells = {}
    for i in {block_of(n) for n in names}:
        prefix = prefixes[i] if i >= 0 else ""
        inner = [n[len(prefix):].split(".")[:-1] for n in names if block_of(n) == i]
        common = []
        for level in zip(*inner):
            if len(set(level)) != 1:
                break
            common.append(level[0])
        parent = prefix + "".join(f"{c}." for c in common)

        def short(name: str, prefix: str = prefix, parent: str = parent) -> str:
            return name[len(parent):] if name.startswith(parent) else name[len(prefix):] if name.startswith(prefix) \
                else name

        for n in names:
            if block_of(n) == i:
                cells[n] = ("" if i < 0 else str(i), short)
    return cells


def summary_rows(results: Dict[str, Any], seconds_key: str, label: str) -> List[List[Any]]:
    rows = []
    if results["fp_top1"] is not None:
        rows = [["top-1 floating point", f"{results['fp_top1']:.2f} %"],
                ["top-1 quantized", f"{results['quant_top1']:.2f} %"],
                ["top-1 agreement with FP", f"{results['top1_agreement']:.2f} %"],
                ["logit SNR vs FP", f"{results['logit_snr_db']} dB"], ["eval images", results["eval_images"]]]
    return rows + [[label, f"{results[seconds_key]:.1f} s (total {results['total_seconds']:.1f} s)"],
                   ["packed file", f"{results['out']} ({results['file_bytes']:,} bytes)"],
                   ["recipe", results["recipe_out"]]]


__all__ = ["compress_options", "resume_option", "run", "layer_cells", "summary_rows"]
