"""``vmq quantize``: post-training quantization (PTQ4VM and baselines) to a packed file."""

from __future__ import annotations

import click

from vmq_cli._compress import compress_options


def _default_out(model_name: str, recipe) -> str:
    from vmq.quant.recipe import scheme_label

    return f"{model_name}-{scheme_label(recipe.quantization).lower()}-{recipe.quantization.method}.safetensors"


@click.command("quantize")
@compress_options("YAML recipe (see configs/); default: PTQ4VM W8A8 on the reference model.",
                  "quantization.scheme=W4A8", "<model>-<scheme>-<method>.safetensors")
def command(recipe_path, overrides, out, stats_path, no_eval, as_json):
    """Quantize a Vim with a recipe and write one packed .safetensors file.

    Prints a per-layer table (bits, granularity, smoothing, output SNR against floating point)
    and the top-1 of the floating-point and the quantized model on the recipe's eval set.
    """
    import time

    import torch

    from vmq.ops.scan_train import training_scan
    from vmq.quant.ptq import quantize_model, resolve_targets
    from vmq.quant.recipe import QuantRecipe, scheme_label
    from vmq.recipe import load_recipe
    from vmq_cli import _console as console
    from vmq_cli._compress import Job

    recipe = load_recipe(recipe_path, QuantRecipe, overrides)
    stage = recipe.quantization
    job = Job.prepare(recipe, out, stats_path, lambda name: _default_out(name, recipe),
                      lambda model: resolve_targets(model, stage))
    model = job.model
    job.collect_stats()
    fp = None if no_eval else job.evaluate("floating point")
    scan = training_scan() if stage.learns or stage.truncates else None
    if scan is None and stage.learns:
        console.warn("the fused CPU training scan could not be built (needs a C++ compiler and ninja); "
                     "JLSS falls back to the much slower reference scan")
    t_quant = time.perf_counter()
    with torch.enable_grad(), console.progress(f"quantizing blocks ({stage.method})", len(model.layers)) as update:
        reports = quantize_model(model, stage, job.images, job.stats, recipe.calibration.batch_size, recipe.seed,
                                 train_scan=scan, on_block=lambda i, n, _p: update(i, n))
    quant_seconds = time.perf_counter() - t_quant
    q = None if no_eval else job.evaluate("quantized")

    results = {"model": model.vmq_name, "scheme": scheme_label(stage), "method": stage.method,
               **job.comparison(fp, q)}
    results.update(job.write(results))
    results["quantize_seconds"] = round(quant_seconds, 2)
    results["layers"] = [r.to_dict() for r in reports]
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
    rows = job.accuracy_rows(fp, q, results)
    rows += [["quantize time", f"{quant_seconds:.1f} s (total {results['total_seconds']:.1f} s)"],
             ["packed file", f"{job.out} ({results['file_bytes']:,} bytes)"], ["recipe", str(job.recipe_out)]]
    console.emit_table("", rows)
