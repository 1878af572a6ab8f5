"""``vmq quantize``: post-training quantization (PTQ4VM and baselines) to a packed file."""

from __future__ import annotations

import click


def _default_out(model_name: str, recipe) -> str:
    from vmq.quant.recipe import scheme_label

    return f"{model_name}-{scheme_label(recipe.quantization).lower()}-{recipe.quantization.method}.safetensors"


def recipe_path_for(out: str):
    from pathlib import Path

    p = Path(out)
    return p.with_name(p.name[: -len(p.suffix)] + ".recipe.yaml" if p.suffix else p.name + ".recipe.yaml")


@click.command("quantize")
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None,
              help="YAML recipe (see configs/); default: PTQ4VM W8A8 on the reference model.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a recipe key, e.g. --set quantization.scheme=W4A8 (repeatable).")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="Packed file to write; default: <model>-<scheme>-<method>.safetensors. The resolved recipe "
                   "is written beside it as <name>.recipe.yaml.")
@click.option("--stats", "stats_path", type=click.Path(dir_okay=False), default=None,
              help="Calibration stats from `vmq calibrate` for this model (skips the statistics pass).")
@click.option("--no-eval", is_flag=True, help="Skip the floating-point and quantized evaluation.")
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def command(recipe_path, overrides, out, stats_path, no_eval, as_json):
    """Quantize a Vim with a recipe and write one packed .safetensors file.

    Prints a per-layer table (bits, granularity, smoothing, output SNR against floating point)
    and the top-1 of the floating-point and the quantized model on the recipe's eval set.
    """
    import time

    from vmq_cli import _console as console
    from vmq_cli._options import load_model

    import torch

    from vmq.calib import CalibStats, collect_stats
    from vmq.data import calibration_images, eval_loader
    from vmq.evaluate import agreement, evaluate
    from vmq.fileio import atomic_path, check_output_path
    from vmq.ops.scan_train import training_scan
    from vmq.pack.format import save_packed
    from vmq.quant.ptq import quantize_model, resolve_targets
    from vmq.quant.recipe import QuantRecipe, scheme_label
    from vmq.recipe import dump_recipe, load_recipe

    start = time.perf_counter()
    recipe = load_recipe(recipe_path, QuantRecipe, overrides)
    stage = recipe.quantization
    torch.manual_seed(recipe.seed)
    torch.set_grad_enabled(False)
    model = load_model(recipe.model.name, recipe.model.checkpoint)
    recipe.model.name = model.vmq_name  # the resolved recipe names what actually ran
    out = out or _default_out(model.vmq_name, recipe)
    recipe_out = recipe_path_for(out)
    check_output_path(out)
    check_output_path(recipe_out)
    resolve_targets(model, stage)  # a bad target list fails before any work
    if stats_path is not None:  # a wrong stats file fails before any work
        stats = CalibStats.load(stats_path)
        stats.check(model, source=str(stats_path))

    images, source = calibration_images(model, recipe.calibration.data, recipe.calibration.num_images)
    if stats_path is None:
        with console.progress("calibration statistics", len(model.layers)) as update:
            stats = collect_stats(model, images, recipe.calibration.batch_size, data=source,
                                  on_block=lambda i, n: update(i, n))

    def run_eval(what: str):
        loader, _, _ = eval_loader(model, recipe.eval.data, recipe.eval.batch_size, recipe.eval.limit)
        with console.progress(f"evaluating {what}", len(loader.dataset)) as update:
            return evaluate(model, loader, on_batch=update, keep_logits=True)

    fp = None if no_eval else run_eval("floating point")
    scan = training_scan() if stage.learns or stage.truncates else None
    if scan is None and stage.learns:
        console.warn("the fused CPU training scan could not be built (needs a C++ compiler and ninja); "
                     "JLSS falls back to the much slower reference scan")
    t_quant = time.perf_counter()
    with torch.enable_grad(), console.progress(f"quantizing blocks ({stage.method})", len(model.layers)) as update:
        reports = quantize_model(model, stage, images, stats, recipe.calibration.batch_size, recipe.seed,
                                 train_scan=scan, on_block=lambda i, n, _p: update(i, n))
    quant_seconds = time.perf_counter() - t_quant
    q = None if no_eval else run_eval("quantized")

    results = {
        "model": model.vmq_name,
        "scheme": scheme_label(stage),
        "method": stage.method,
        "fp_top1": None if fp is None else fp["top1"],
        "quant_top1": None if q is None else q["top1"],
        "fp_top5": None if fp is None else fp["top5"],
        "quant_top5": None if q is None else q["top5"],
        "eval_images": None if q is None else q["num_images"],
        **({"top1_agreement": None, "logit_snr_db": None} if q is None else agreement(fp["logits"], q["logits"])),
        "eval_data": recipe.eval.data or "(shipped CIFAR-10 lossless test subset)",
        "calibration_images": int(images.shape[0]),
        "calibration_data": source,
        "stats": None if stats_path is None else {k: stats.meta.get(k) for k in ("data", "num_images", "weights_sha256")},
    }
    resolved = recipe.model_dump(mode="json")
    with atomic_path(recipe_out) as tmp_recipe:
        tmp_recipe.write_text(dump_recipe(recipe), encoding="utf-8")
        save_packed(model, out, resolved, results)  # no timings in the file: same inputs, same bytes
    from pathlib import Path

    results.update({
        "quantize_seconds": round(quant_seconds, 2),
        "out": str(out),
        "recipe_out": str(recipe_out),
        "file_bytes": Path(out).stat().st_size,
        "total_seconds": round(time.perf_counter() - start, 2),
        "layers": [r.to_dict() for r in reports],
    })
    if as_json:
        console.emit_json(results)
        return
    def row(r):
        block, _, layer = r.name.partition(".mixer.")
        smoothing = r.smoothing.replace(f"folded into {block}.", "folded: ").replace("mixer.", "")
        return [block.replace("layers.", ""), layer, f"W{r.w_bits} {r.w_strategy}",
                f"A{r.a_bits} {r.a_strategy}" if r.a_bits else "A16", smoothing,
                "inf" if r.snr_db == float("inf") else f"{r.snr_db:.1f}"]

    console.emit_table(f"vmq quantize: {model.vmq_name} {results['scheme']} {stage.method}",
                       [row(r) for r in reports],
                       headers=("block", "layer", "weights", "activations", "smoothing", "SNR dB"))
    rows = []
    if fp is not None:
        rows += [["top-1 floating point", f"{fp['top1']:.2f} %"], ["top-1 quantized", f"{q['top1']:.2f} %"],
                 ["top-1 agreement with FP", f"{results['top1_agreement']:.2f} %"],
                 ["logit SNR vs FP", f"{results['logit_snr_db']} dB"], ["eval images", q["num_images"]]]
    rows += [["quantize time", f"{quant_seconds:.1f} s (total {results['total_seconds']:.1f} s)"],
             ["packed file", f"{out} ({results['file_bytes']:,} bytes)"], ["recipe", str(recipe_out)]]
    console.emit_table("", rows)
