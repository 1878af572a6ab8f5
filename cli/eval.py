"""``vmq eval``: top-1, top-5, images/s and parameter count of a model on an image folder."""

from __future__ import annotations

import click

from vmq_cli._options import (backend_option, check_device, device_option, model_options, threads_option,
                              verify_option)


@click.command("eval")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@model_options
@click.option("--data", type=click.Path(), default=None,
              help="ImageNet-layout folder (<dir>/<class>/<image>, or <dir>/val/...); default: the shipped "
                   "CIFAR-10 test subset.")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Evaluate only the first N images.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="Processes that read and decode the images; default: one per two CPUs available (at most 8) "
                   "for a folder, 0 for the shipped set; 0 reads them in the main process.")
@click.option("--skip-bad", is_flag=True,
              help="Skip images that cannot be read (counted in the results) instead of stopping at the first.")
@device_option
@backend_option
@threads_option
@verify_option
@click.option("--json", "as_json", is_flag=True, help="Print results as JSON (timm validate.py keys).")
def command(path, model_name, checkpoint, data, batch_size, limit, workers, skip_bad, device, backend, no_verify,
            as_json):
    """Evaluate a model or a packed file from `vmq quantize` / `vmq vq`.

    PATH is a packed .safetensors file (rebuilt from the file alone) or a checkpoint (same as
    --checkpoint). With no arguments: the shipped reference model on the shipped test subset.
    Under torchrun each process evaluates a shard of the images; rank 0 prints the figures of all.
    """
    from vmq_cli import _console as console

    check_device(device)
    import torch

    from vmq.compress.api import load_model, no_progress
    from vmq.data import eval_loader
    from vmq.distributed import launch, shard_loader
    from vmq.errors import UsageError
    from vmq.evaluate import evaluate, param_count
    from vmq.ops.backend import use_backend
    from vmq.pack.format import is_packed, load_packed
    from vmq.runtime import retain_freed_memory

    retain_freed_memory()
    packed_meta = None
    if path is not None and checkpoint is not None:
        raise UsageError("give either PATH or --checkpoint, not both")
    checkpoint = checkpoint or path
    if checkpoint is not None and is_packed(checkpoint):
        if model_name is not None:
            raise UsageError("--model does not apply to a packed file (it names its own model)")
        model, packed_meta = load_packed(checkpoint, verify=not no_verify)
    else:
        model = load_model(model_name, checkpoint)
    with launch(device) as (dist, rank_device):
        model.to(rank_device)
        loader, data_cfg, _ = eval_loader(model, data, batch_size=batch_size, limit=limit, workers=workers,
                                          pin_memory=rank_device.startswith("cuda"))
        loader = shard_loader(loader, dist)
        progress = console.progress if dist.is_main else no_progress
        with progress("evaluating", len(loader.dataset), unit="images") as update, use_backend(backend):
            metrics = evaluate(model, loader, on_batch=update, skip_bad=skip_bad, dist=dist)
    if not dist.is_main:  # rank 0 prints
        return
    if metrics["skipped_images"]:
        console.warn(f"skipped {metrics['skipped_images']} image(s) that could not be read; the first: "
                     f"{metrics['skipped_errors'][0] if metrics['skipped_errors'] else '(on another process)'}")
    result = {
        "model": model.vmq_name,
        **{k: metrics[k] for k in ("top1", "top1_err", "top5", "top5_err")},
        "param_count": round(param_count(model) / 1e6, 4),
        "img_size": data_cfg["input_size"][-1],
        "crop_pct": data_cfg["crop_pct"],
        "interpolation": data_cfg["interpolation"],
        "num_images": metrics["num_images"],
        "skipped_images": metrics["skipped_images"],
        "images_per_sec": metrics["images_per_sec"],
        "threads": torch.get_num_threads(),
        "workers": loader.num_workers,
        "device": device,
        "backend": backend,
        "checkpoint": checkpoint or "(shipped reference weights)",
        "data": data or "(shipped CIFAR-10 lossless test subset)",
    }
    if packed_meta is not None:
        reported = packed_meta.get("results", {})
        result["packed"] = {"scheme": reported.get("scheme"), "method": reported.get("method"),
                            "reported_top1": reported.get("quant_top1"), "reported_fp_top1": reported.get("fp_top1"),
                            "reported_eval_images": reported.get("eval_images"),
                            "checksum": packed_meta["payload_check"]}
    if as_json:
        console.emit_json(result)
    else:
        console.emit_table(f"vmq eval: {result['model']}", [
            ["top-1", f"{result['top1']:.2f} %"], ["top-5", f"{result['top5']:.2f} %"],
            ["images", result["num_images"]],
            *([["skipped (unreadable)", result["skipped_images"]]] if skip_bad else []),
            ["images/s", f"{result['images_per_sec']:.1f} ({device}, backend {backend}, {result['threads']} threads, "
                         f"{result['workers']} data workers)"],
            ["parameters", f"{param_count(model):,}"], ["data", result["data"]],
            ["checkpoint", result["checkpoint"]],
        ] + ([["packed", _packed_line(result["packed"])]] if packed_meta is not None else []))


def _packed_line(p: dict) -> str:
    line = f"{p['scheme']} {p['method']}"
    if p.get("reported_top1") is not None:
        line += f"; quantize reported top-1 {p['reported_top1']} % on {p['reported_eval_images']} images"
    return line
