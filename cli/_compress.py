"""What ``vmq quantize`` and ``vmq vq`` share: setup checks, calibration, evaluation, writing."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import click


def compress_options(recipe_help: str, set_example: str, out_pattern: str) -> Callable:
    """The options ``vmq quantize`` and ``vmq vq`` share (recipe, overrides, output, stats, eval, JSON)."""
    options = [
        click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False), default=None, help=recipe_help),
        click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
                     help=f"Override a recipe key, e.g. --set {set_example} (repeatable)."),
        click.option("--out", type=click.Path(dir_okay=False), default=None,
                     help=f"Packed file to write; default: {out_pattern}. The resolved recipe is written beside it "
                          "as <name>.recipe.yaml."),
        click.option("--stats", "stats_path", type=click.Path(dir_okay=False), default=None,
                     help="Calibration stats from `vmq calibrate` for this model (skips the statistics pass)."),
        click.option("--no-eval", is_flag=True, help="Skip the floating-point and quantized evaluation."),
        click.option("--json", "as_json", is_flag=True, help="Print results as JSON."),
    ]

    def decorate(f: Callable) -> Callable:
        for option in reversed(options):
            f = option(f)
        return f

    return decorate


def recipe_path_for(out: str) -> Path:
    p = Path(out)
    return p.with_name(p.name[: -len(p.suffix)] + ".recipe.yaml" if p.suffix else p.name + ".recipe.yaml")


@dataclass
class Job:
    """One compression command's run: the model, its outputs, its calibration data and stats."""

    recipe: Any
    model: Any
    out: str
    recipe_out: Path
    images: Any = None
    source: str = ""
    stats: Any = None
    stats_path: Optional[str] = None
    start: float = field(default_factory=time.perf_counter)

    @classmethod
    def prepare(cls, recipe, out: Optional[str], stats_path: Optional[str], default_out: Callable[[str], str],
                check_targets: Callable[[Any], None]) -> "Job":
        """Load the model, check outputs, targets and the stats file before any work, load images."""
        import torch

        from vmq.calib import CalibStats
        from vmq.data import calibration_images
        from vmq.fileio import check_output_path
        from vmq_cli._options import load_model

        start = time.perf_counter()
        torch.manual_seed(recipe.seed)
        torch.set_grad_enabled(False)
        model = load_model(recipe.model.name, recipe.model.checkpoint)
        recipe.model.name = model.vmq_name  # the resolved recipe names what actually ran
        out = out or default_out(model.vmq_name)
        recipe_out = recipe_path_for(out)
        check_output_path(out)
        check_output_path(recipe_out)
        check_targets(model)  # a bad target list fails before any work
        stats = None
        if stats_path is not None:  # a wrong stats file fails before any work
            stats = CalibStats.load(stats_path)
            stats.check(model, source=str(stats_path))
        images, source = calibration_images(model, recipe.calibration.data, recipe.calibration.num_images)
        return cls(recipe, model, out, recipe_out, images, source, stats, stats_path, start)

    def collect_stats(self) -> None:
        """The statistics pass, unless a stats file was given."""
        from vmq.calib import collect_stats
        from vmq_cli import _console as console

        if self.stats is not None:
            return
        with console.progress("calibration statistics", len(self.model.layers)) as update:
            self.stats = collect_stats(self.model, self.images, self.recipe.calibration.batch_size, data=self.source,
                                       on_block=lambda i, n: update(i, n))

    def evaluate(self, what: str) -> dict:
        from vmq.data import eval_loader
        from vmq.evaluate import evaluate
        from vmq_cli import _console as console

        ev = self.recipe.eval
        loader, _, _ = eval_loader(self.model, ev.data, ev.batch_size, ev.limit)
        with console.progress(f"evaluating {what}", len(loader.dataset)) as update:
            return evaluate(self.model, loader, on_batch=update, keep_logits=True)

    def comparison(self, fp: Optional[dict], q: Optional[dict]) -> Dict[str, Any]:
        """The result fields both commands report about accuracy and data."""
        from vmq.evaluate import agreement

        return {
            "fp_top1": None if fp is None else fp["top1"],
            "quant_top1": None if q is None else q["top1"],
            "fp_top5": None if fp is None else fp["top5"],
            "quant_top5": None if q is None else q["top5"],
            "eval_images": None if q is None else q["num_images"],
            **({"top1_agreement": None, "logit_snr_db": None} if q is None else agreement(fp["logits"], q["logits"])),
            "eval_data": self.recipe.eval.data or "(shipped CIFAR-10 lossless test subset)",
            "calibration_images": int(self.images.shape[0]),
            "calibration_data": self.source,
            "stats": None if self.stats_path is None else {
                k: self.stats.meta.get(k) for k in ("data", "num_images", "weights_sha256")},
        }

    def write(self, results: dict) -> dict:
        """Write the packed file and the resolved recipe atomically; returns the file facts."""
        from vmq.fileio import atomic_path
        from vmq.pack.format import save_packed
        from vmq.recipe import dump_recipe

        resolved = self.recipe.model_dump(mode="json")
        with atomic_path(self.recipe_out) as tmp_recipe:
            tmp_recipe.write_text(dump_recipe(self.recipe), encoding="utf-8")
            save_packed(self.model, self.out, resolved, results)  # no timings in the file: same inputs, same bytes
        return {"out": str(self.out), "recipe_out": str(self.recipe_out), "file_bytes": Path(self.out).stat().st_size,
                "total_seconds": round(time.perf_counter() - self.start, 2)}

    def accuracy_rows(self, fp: Optional[dict], q: Optional[dict], results: dict) -> list:
        if fp is None:
            return []
        return [["top-1 floating point", f"{fp['top1']:.2f} %"], ["top-1 quantized", f"{q['top1']:.2f} %"],
                ["top-1 agreement with FP", f"{results['top1_agreement']:.2f} %"],
                ["logit SNR vs FP", f"{results['logit_snr_db']} dB"], ["eval images", q["num_images"]]]


__all__ = ["Job", "compress_options", "recipe_path_for"]
