"""``vmq calibrate``: run the floating-point model on calibration images and cache what compression needs."""

from __future__ import annotations

import click

from vmq_cli._options import (check_device, check_memory, device_option, memory_options, model_options,
                              threads_option)


@click.command("calibrate")
@model_options
@click.option("--data", type=click.Path(), default=None,
              help="ImageNet-layout folder of calibration images; default: the reference model's shipped "
                   "CIFAR-10 training subset.")
@click.option("--num-images", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--out", type=click.Path(dir_okay=False), required=True, help="Stats file to write (.safetensors).")
@device_option
@threads_option
@memory_options
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from the per-block progress kept beside the output "
                   "(<out>.progress/); refused when that was made with another model or calibration set. Under "
                   "torchrun, rank 0 keeps it, and any number of processes may resume it.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def command(model_name, checkpoint, data, num_images, batch_size, out, device, max_memory, offload_dir, resume,
            as_json):
    """Record per-layer input statistics of a model for `vmq quantize --stats`.

    For every linear layer inside the blocks: min and max per (token, channel) and the
    per-channel second moment, computed block by block on the floating-point model. The file
    is tied to the model (name, configuration and a hash of its weights). Under torchrun each
    process runs a shard of the images, the statistics are reduced exactly, and rank 0 writes.
    """
    import time

    from vmq_cli import _console as console

    check_device(device)
    budget = check_memory(max_memory, offload_dir, device)
    from vmq.activations import ActivationStore
    from vmq.calib import collect_stats
    from vmq.compress.api import load_model, no_progress
    from vmq.data import calibration_images
    from vmq.distributed import Part, launch
    from vmq.fileio import check_output_path
    from vmq.models import family_of
    from vmq.progress import progress_path_for, refuse_unasked

    start = time.perf_counter()
    with launch(device) as (dist, device):
        progress_dir = progress_path_for(out)
        dist.check_on_main(lambda: (check_output_path(out), refuse_unasked(progress_dir, resume)))
        model = load_model(model_name, checkpoint).to(device)
        part = Part.of(dist, num_images, batch_size)
        images, source = calibration_images(model, data, num_images, slice(part.start, part.stop))
        progress = console.progress if dist.is_main else no_progress
        with progress("calibrating blocks", len(family_of(model).blocks(model))) as update, \
                ActivationStore(device, budget) as store:
            stats = collect_stats(model, images, batch_size, data=source, on_block=lambda i, n: update(i, n),
                                  store=store, dist=dist, progress_dir=progress_dir, resume=resume)
    if not dist.is_main:  # rank 0 writes and prints
        return
    stats.save(out)
    result = {
        "model": model.vmq_name,
        "stats": str(out),
        "num_images": part.total,
        "data": source,
        "layers": len(stats.layers),
        "tokens": sorted({st.tokens for st in stats.layers.values()}),
        "weights_sha256": stats.meta["weights_sha256"],
        "seconds": round(time.perf_counter() - start, 2),
        "activations": store.report(),
    }
    if as_json:
        console.emit_json(result)
    else:
        console.emit_table(f"vmq calibrate: {result['model']}",
                           [[k, v] for k, v in result.items() if k not in ("model", "activations")])
