"""``vmq vq``: weight vector quantization (ViM-VQ, k-means baseline) to a packed file."""

from __future__ import annotations

import click

from vmq_cli._compress import compress_options


def _default_out(model_name: str, recipe) -> str:
    from vmq.vq.recipe import vq_label

    return f"{model_name}-vq-{vq_label(recipe.vq)}-{recipe.vq.method}.safetensors"


@click.command("vq")
@compress_options("YAML recipe (see configs/vq-*.yaml); default: ViM-VQ, d=2 K=16 (2 bits) on the reference model.",
                  "vq.codebook.size=64", "<model>-vq-<label>-<method>.safetensors")
def command(recipe_path, overrides, out, stats_path, no_eval, as_json):
    """Vector-quantize a Vim's weights with a recipe and write one packed .safetensors file.

    Prints a per-layer table (codebook, bits per weight with and without the codebook
    overhead, output SNR against floating point, time) and the top-1 of the floating-point and
    the vector-quantized model on the recipe's eval set.
    """
    import time

    from vmq.ops.scan_train import training_scan
    from vmq.recipe import load_recipe
    from vmq.vq.pipeline import check_model, vq_model
    from vmq.vq.recipe import VQRecipe, vq_label
    from vmq_cli import _console as console
    from vmq_cli._compress import Job

    recipe = load_recipe(recipe_path, VQRecipe, overrides)
    stage = recipe.vq
    job = Job.prepare(recipe, out, stats_path, lambda name: _default_out(name, recipe),
                      lambda model: check_model(model, stage))
    model = job.model
    job.collect_stats()
    fp = None if no_eval else job.evaluate("floating point")
    scan = training_scan() if stage.learns else None
    if scan is None and stage.learns:
        console.warn("the fused CPU training scan could not be built (needs a C++ compiler and ninja); "
                     "the search falls back to the much slower reference scan")
    t_vq = time.perf_counter()
    with console.progress(f"vector-quantizing blocks ({stage.method})", len(model.layers)) as update:
        reports = vq_model(model, stage, job.images, job.stats, recipe.calibration.batch_size, recipe.seed,
                           train_scan=scan, on_block=lambda i, n, _p: update(i, n))
    vq_seconds = time.perf_counter() - t_vq
    q = None if no_eval else job.evaluate("vector-quantized")

    weights = sum(r.weights for r in reports)
    results = {
        "model": model.vmq_name,
        "scheme": vq_label(stage),
        "method": stage.method,
        **job.comparison(fp, q),
        "code_bits_per_weight": round(sum(r.code_bits_per_weight * r.weights for r in reports) / weights, 4),
        "bits_per_weight": round(sum(r.bits_per_weight * r.weights for r in reports) / weights, 4),
        "vq_weights": weights,
    }
    results.update(job.write(results))
    results["vq_seconds"] = round(vq_seconds, 2)
    results["layers"] = [r.to_dict() for r in reports]
    if as_json:
        console.emit_json(results)
        return

    def row(r):
        block, _, layer = r.name.partition(".mixer.")
        return [block.replace("layers.", ""), layer, f"d={r.dim} K={r.size}" + (f" x{r.groups}" if r.groups > 1 else ""),
                f"{r.code_bits_per_weight:.2f}", f"{r.bits_per_weight:.2f}", f"A{r.a_bits}" if r.a_bits else "A16",
                "inf" if r.snr_db == float("inf") else f"{r.snr_db:.1f}", f"{r.seconds:.1f}"]

    console.emit_table(f"vmq vq: {model.vmq_name} {results['scheme']} {stage.method}", [row(r) for r in reports],
                       headers=("block", "layer", "codebook", "b/w", "b/w+cb", "act", "SNR dB", "s"))
    rows = job.accuracy_rows(fp, q, results)
    rows += [["bits per weight", f"{results['code_bits_per_weight']:.3f} codes, {results['bits_per_weight']:.3f} "
                                 "with codebooks and scales"],
             ["vq time", f"{vq_seconds:.1f} s (total {results['total_seconds']:.1f} s)"],
             ["packed file", f"{job.out} ({results['file_bytes']:,} bytes)"], ["recipe", str(job.recipe_out)]]
    console.emit_table("", rows)
