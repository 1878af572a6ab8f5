"""``vmq bench``: latency, throughput and peak memory of a floating-point model and its compressed model."""

from __future__ import annotations

import click

from vmq_cli._options import backend_option, check_device, threads_option, verify_option


@click.command("bench")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@click.option("--model", "model_name", default=None,
              help="Registered model name, for a floating-point checkpoint (or alone, with random weights "
                   "for a speed-only run of its architecture).")
@click.option("--batch", "batch", default="1,8,64", show_default=True, help="Comma-separated batch sizes.")
@click.option("--device", default="cpu", show_default=True, metavar="cpu|cuda[:N]",
              help="Where to time the models (on CUDA the baseline is fp16).")
@backend_option
@click.option("--repeats", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed forwards per model and batch size (medians are reported).")
@click.option("--warmup", type=click.IntRange(min=0), default=3, show_default=True)
@threads_option
@click.option("--layers", is_flag=True, help="Add a per-layer breakdown (a second pass with timing hooks).")
@verify_option
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON.")
def command(path, model_name, batch, device, backend, repeats, warmup, layers, no_verify, as_json):
    """Time a quantized model against its floating-point baseline, in one interleaved run.

    PATH is a packed file from `vmq quantize` / `vmq vq` (the baseline is the same model with
    the file's weights dequantized) or a floating-point checkpoint (timed alone). With no PATH:
    the shipped reference model, or --model's architecture. On CUDA the baseline runs in fp16,
    on mamba-ssm's fused scan when it is installed (the output says which).
    """
    from vmq_cli import _console as console

    check_device(device)
    from vmq.bench import BenchModel, float_twin, gpu_baseline, parse_batches, run_bench

    batches = parse_batches(batch)
    import torch

    from vmq.compress.api import RANDOM_WEIGHTS, load_model
    from vmq.distributed import launched
    from vmq.errors import UsageError
    from vmq.models import family_of
    from vmq.pack.format import is_packed, load_packed
    from vmq.runtime import retain_freed_memory

    if launched():
        raise UsageError("bench measures one process: run it without torchrun")
    torch.set_grad_enabled(False)
    retained = retain_freed_memory()  # for both models: activations reused, not faulted in again
    packed_meta = None
    if path is not None and is_packed(path):
        if model_name is not None:
            raise UsageError("--model does not apply to a packed file (it names its own model)")
        quant, packed_meta = load_packed(path, verify=not no_verify)
        fp = float_twin(quant)
        fp.vmq_name = quant.vmq_name
    elif path is None and model_name is not None:  # architecture only: random weights
        fp, quant = load_model(model_name, RANDOM_WEIGHTS), None
    else:
        fp, quant = load_model(model_name, path), None
    if torch.device(device).type == "cuda":
        models = [gpu_baseline(fp)]
    else:
        models = [BenchModel("fp32", fp, torch.float32, {"scan": "vmq multi_scan"})]
    if quant is not None:
        scheme = (packed_meta.get("results") or {}).get("scheme") or "quantized"
        models.append(BenchModel(str(scheme), quant, torch.float32))
    image_size = family_of(fp).input_size(fp)[-1]
    with console.progress("benchmarking", None, every_s=15.0) as update:
        steps = iter(range(1, 1 << 30))
        result = run_bench(models, image_size, batches, torch.device(device), repeats=repeats, warmup=warmup,
                           layers=layers, backend=backend, on_step=lambda _msg: update(next(steps)))
    result = {"model": getattr(fp, "vmq_name", model_name), "file": path, **result,
              "allocator": "glibc, freed memory retained" if retained else "default"}
    if as_json:
        console.emit_json(result)
        return
    _print(console, result)


def _print(console, result: dict) -> None:
    labels = list(result["models"])
    rows = []
    for row in result["results"]:
        for label in labels:
            r = row["models"][label]
            rows.append([str(row["batch"]), label, f"{r['latency_ms']:.2f}", f"{r['images_per_sec']:.1f}",
                         f"{r['speedup']:.2f}x", "-" if r["peak_memory_mb"] is None else f"{r['peak_memory_mb']:.1f}"])
    where = result["gpu"] or f"cpu, {result['threads']} threads"
    console.emit_table(f"vmq bench: {result['model']} ({where}, backend {result['backend']}, "
                       f"median of {result['repeats']}, allocator {result['allocator']})", rows,
                       headers=("batch", "model", "latency ms", "images/s", f"vs {result['baseline']}", "peak MB"))
    notes = [[label, f"{info['dtype']}, weights {info['weight_mb']:.2f} MB"
              + (f", scan: {info['scan']}" if info.get("scan") else "")] for label, info in result["models"].items()]
    console.emit_table("models", notes)
    for batch, per_model in result.get("layers", {}).items():
        groups = list(next(iter(per_model.values())))
        rows = [[g] + [f"{per_model[label][g]:.3f}" for label in labels] for g in groups]
        console.emit_table(f"per-layer ms, batch {batch} (hooks sync around each part)", rows,
                           headers=("part", *labels))
