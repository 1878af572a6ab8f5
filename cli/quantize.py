"""``vmq quantize``: post-training quantization (PTQ4VM and baselines) to a packed file."""

from __future__ import annotations

import click

from vmq_cli._compress import compress_options


@click.command("quantize")
@compress_options("YAML recipe (see configs/); default: PTQ4VM W8A8 on the reference model.",
                  "quantization.scheme=W4A8", "<model>-<scheme>-<method>.safetensors")
def command(recipe_path, overrides, out, stats_path, device, no_eval, resume, as_json, max_memory, offload_dir):
    """Quantize a model with a recipe and write one packed .safetensors file.

    Prints a per-layer table (bits, granularity, smoothing, output SNR against floating point)
    and the top-1 of the floating-point and the quantized model on the recipe's eval set.
    """
    from vmq.models import family_of
    from vmq_cli import _console as console
    from vmq_cli._compress import layer_cells, run, summary_rows

    result, results = run("quantization", recipe_path, overrides, out, stats_path, device, no_eval,
                          lambda name, method: f"{name}-{method.label().lower()}-{method.name}.safetensors",
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
        smoothing = r.smoothing
        if smoothing.startswith("folded into "):
            smoothing = "folded: " + short(smoothing[len("folded into "):])
        return [block, short(r.name), f"W{r.w_bits} {r.w_strategy}",
                f"A{r.a_bits} {r.a_strategy}" if r.a_bits else "A16", smoothing,
                "inf" if r.snr_db == float("inf") else f"{r.snr_db:.1f}"]

    console.emit_table(f"vmq quantize: {results['model']} {results['scheme']} {results['method']}",
                       [row(r) for r in result.reports],
                       headers=("block", "layer", "weights", "activations", "smoothing", "SNR dB"), no_wrap=(0, 1))
    console.emit_table("", summary_rows(results, "quantize_seconds", "quantize time"))
