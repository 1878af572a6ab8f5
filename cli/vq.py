"""``vmq vq``: weight vector quantization (ViM-VQ, k-means baseline) to a packed file."""

from __future__ import annotations

import click

from vmq_cli._compress import compress_options


@click.command("vq")
@compress_options("YAML recipe (see configs/vq-*.yaml); default: ViM-VQ, d=2 K=16 (2 bits) on the reference model.",
                  "vq.codebook.size=64", "<model>-vq-<label>-<method>.safetensors")
def command(recipe_path, overrides, out, stats_path, device, no_eval, resume, as_json, max_memory, offload_dir):
    """Vector-quantize a model's weights with a recipe and write one packed .safetensors file.

    Prints a per-layer table (codebook, bits per weight with and without the codebook
    overhead, output SNR against floating point, time) and the top-1 of the floating-point and
    the vector-quantized model on the recipe's eval set.
    """
    from vmq.models import family_of
    from vmq_cli import _console as console
    from vmq_cli._compress import layer_cells, run, summary_rows

    result, results = run("vq", recipe_path, overrides, out, stats_path, device, no_eval,
                          lambda name, method: f"{name}-vq-{method.label()}-{method.name}.safetensors",
                          max_memory=max_memory, offload_dir=offload_dir, resume=resume)
    if results is None:  # not rank 0 under torchrun: rank 0 prints
        return
    if as_json:
        console.emit_json(results)
        return
    prefixes = [p for p, _ in family_of(result.model).blocks(result.model)]
    cells = layer_cells([r.name for r in result.reports], prefixes)

    def row(r):
        block, short = cells[r.name]
        return [block, short(r.name), f"d={r.dim} K={r.size}" + (f" x{r.groups}" if r.groups > 1 else ""),
                f"{r.code_bits_per_weight:.2f}", f"{r.bits_per_weight:.2f}", f"A{r.a_bits}" if r.a_bits else "A16",
                "inf" if r.snr_db == float("inf") else f"{r.snr_db:.1f}", f"{r.seconds:.1f}"]

    console.emit_table(f"vmq vq: {results['model']} {results['scheme']} {results['method']}",
                       [row(r) for r in result.reports],
                       headers=("block", "layer", "codebook", "b/w", "b/w+cb", "act", "SNR dB", "s"), no_wrap=(0, 1))
    rows = [["bits per weight", f"{results['code_bits_per_weight']:.3f} codes, {results['bits_per_weight']:.3f} "
                                "with codebooks and scales"]]
    console.emit_table("", rows + summary_rows(results, "vq_seconds", "vq time"))
