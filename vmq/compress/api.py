"""The one-call library entry point: ``vmq.compress(recipe)`` (what ``vmq quantize`` and ``vmq vq`` run).

    result = vmq.compress("configs/w4a8.yaml")           # or a dict, or a parsed recipe
    result.model                                         # the compressed model (runtime layers)
    result.results()                                     # accuracy, agreement, per-layer reports
    result.save("w4a8.safetensors")                      # packed file + resolved recipe beside it

    # killed midway and called again: the finished blocks come from the progress folder
    result = vmq.compress("configs/w4a8.yaml", progress_dir="w4a8.safetensors.progress", resume=True)

The recipe's stage (``quantization:`` or ``vq:``) picks a registered method
(:mod:`vmq.compress.methods`). Model, calibration images and calibration statistics come from
the recipe unless given; the device is ``device``, else the recipe's. Grad mode and random
state are handled inside: nothing global is changed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from vmq.activations import ActivationStore, MemoryBudget
from vmq.calib import CalibStats, collect_stats
from vmq.compress.engine import compress_model
from vmq.compress.methods import Method, method_for
from vmq.compress.resume import compress_identity
from vmq.data import calibration_images, eval_loader
from vmq.distributed import Dist, Part, shard_loader
from vmq.env import check_device
from vmq.errors import VmqError
from vmq.evaluate import evaluate
from vmq.fileio import atomic_path
from vmq.metrics import agreement
from vmq.models import canonical_name, config_for, create_model, family_of, reference_models
from vmq.pack.format import is_packed, save_packed
from vmq.progress import ProgressStore
from vmq.quant.recipe import QuantRecipe
from vmq.recipe import Recipe, dump_recipe, load_recipe, parse_recipe, read_recipe_yaml
from vmq.vq.recipe import VQRecipe

#: ``progress(description, total)``: a context manager yielding ``update(done, total)``
Progress = Callable[[str, Optional[int]], ContextManager[Callable[..., None]]]


@contextmanager
def no_progress(description: str, total: Optional[int], unit: Optional[str] = None) -> Iterator[Callable[..., None]]:
    """A :data:`Progress` that shows nothing (``unit``: what the counts count, for a rate)."""
    yield lambda *args: None


def read_recipe(recipe: Union[Recipe, dict, str, Path, None], overrides: Sequence[str] = (),
                kind: Optional[str] = None) -> Recipe:
    """A validated recipe from a parsed one, a mapping or a YAML path; ``kind`` ("quantization" or
    "vq") when the caller knows it, else the mapping's stage key decides (``quantization`` by default)."""
    if isinstance(recipe, Recipe):
        return recipe.model_copy(deep=True)  # resolving fills it in: the caller's stays as it was
    schema = {"quantization": QuantRecipe, "vq": VQRecipe}
    if isinstance(recipe, dict):
        kind = kind or ("vq" if "vq" in recipe else "quantization")
        return parse_recipe(dict(recipe), schema[kind], overrides)
    if recipe is not None and not isinstance(recipe, (str, Path)):
        raise VmqError(f"a recipe is a parsed recipe, a mapping or a YAML path, not {type(recipe).__name__}")
    return load_recipe(recipe, schema[kind or _kind_of_file(recipe)], overrides)


def _kind_of_file(path: Union[str, Path, None]) -> str:
    """``vq`` for a YAML recipe with a ``vq:`` block, else ``quantization`` (a bad file raises its VmqError)."""
    raw = read_recipe_yaml(path) if path is not None else None
    return "vq" if isinstance(raw, dict) and "vq" in raw else "quantization"


def stage_of(recipe: Recipe) -> str:
    return "vq" if isinstance(recipe, VQRecipe) else "quantization"


def resolve_device(device: Optional[str], recipe: Recipe) -> torch.device:
    """``device`` (or the recipe's), checked to exist; the recipe records what runs."""
    name = device or recipe.device
    dev = check_device(name)
    recipe.device = name
    return dev


#: ``model.checkpoint`` / ``--checkpoint`` value for randomly initialised weights (speed and
#: memory runs of an architecture, pipeline checks): always the same weights (seed 0)
RANDOM_WEIGHTS = "random"
RANDOM_WEIGHTS_WARNING = ("model.checkpoint is 'random': the model has randomly initialised weights (seed 0), "
                          "so its accuracy figures mean nothing")


def load_model(name: Optional[str], checkpoint: Optional[str]) -> nn.Module:
    """The floating-point model a command or recipe names (a packed file is refused by name).

    ``checkpoint`` :data:`RANDOM_WEIGHTS` (``"random"``): model ``name`` with randomly initialised
    weights, the same on every call and machine (drawn on the CPU from seed 0; the process's
    random state is left as it was)."""
    if checkpoint == RANDOM_WEIGHTS:
        if name is None:
            raise VmqError("random weights (checkpoint 'random') need a model name (model.name / --model)")
        config_for(name)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(0)
            return create_model(name, None, pretrained=False)
    if checkpoint is not None and is_packed(checkpoint):
        raise VmqError(f"{checkpoint} is a vmq packed (quantized) file, not a floating-point checkpoint; "
                       f"evaluate it with `vmq eval {checkpoint}`")
    if name is not None:
        config_for(name)
        if checkpoint is None and canonical_name(name) not in reference_models():
            raise VmqError(f"--model {name} needs --checkpoint: vmq ships weights only for its reference models "
                           f"({', '.join(reference_models())}); --checkpoint {RANDOM_WEIGHTS} gives random weights")
    return create_model(name, checkpoint, pretrained=checkpoint is None)


@dataclass
class CompressResult:
    """What :func:`compress` returns: the compressed model and everything measured on the way."""

    model: nn.Module
    recipe: Recipe
    method: Method
    reports: List[Any]
    metrics: Dict[str, Any]  # accuracy, agreement and data facts (see :meth:`results`)
    seconds: float  # the compression itself
    timings: Dict[str, float] = field(default_factory=dict)
    activations: Dict[str, Optional[int]] = field(default_factory=dict)  # where block activations were kept
    #: the per-block progress kept while compressing (``progress_dir``); :meth:`save` removes it
    progress: Optional[ProgressStore] = field(default=None, repr=False)

    def results(self) -> Dict[str, Any]:
        """JSON-ready results: what the packed file records (no timings: same inputs, same bytes)."""
        return {"model": self.model.vmq_name, "scheme": self.method.label(), "method": self.method.name,
                **self.metrics, **self.method.summary(self.reports)}

    def save(self, path: Union[str, Path], recipe_path: Union[str, Path, None] = None) -> Dict[str, Any]:
        """Write the packed file and the resolved recipe (default ``<name>.recipe.yaml`` beside it),
        atomically, then remove the progress folder of the run; returns the file facts."""
        recipe_path = Path(recipe_path) if recipe_path is not None else recipe_path_for(path)
        with atomic_path(recipe_path) as tmp_recipe:
            tmp_recipe.write_text(dump_recipe(self.recipe), encoding="utf-8")
            save_packed(self.model, path, self.recipe.model_dump(mode="json"), self.results())
        if self.progress is not None:
            self.progress.remove()
            self.progress = None
        return {"out": str(path), "recipe_out": str(recipe_path), "file_bytes": Path(path).stat().st_size}


def recipe_path_for(out: Union[str, Path]) -> Path:
    p = Path(out)
    return p.with_name(p.name[: -len(p.suffix)] + ".recipe.yaml" if p.suffix else p.name + ".recipe.yaml")


def compress(recipe: Union[Recipe, dict, str, Path, None], model: Optional[nn.Module] = None,
             images: Optional[Tensor] = None, stats: Optional[CalibStats] = None, device: Optional[str] = None,
             overrides: Sequence[str] = (), evaluate_model: bool = True,
             progress: Progress = no_progress, max_memory: Union[str, int, None] = None,
             offload_dir: Union[str, Path, None] = None, dist: Optional[Dist] = None,
             progress_dir: Union[str, Path, None] = None, resume: bool = False) -> CompressResult:
    """Compress a model with a recipe; see the module docstring.

    ``model``: a registered model to compress in place (default: the recipe's ``model``);
    ``images``: calibration images (N, C, H, W) (default: the recipe's ``calibration``);
    ``stats``: calibration statistics of this model (default: a statistics pass);
    ``evaluate_model``: measure the floating-point and the compressed model on the recipe's
    eval set (top-1, agreement, logit SNR);
    ``max_memory`` (bytes, or a size such as ``"8GB"``): the most bytes of block activations kept
    on ``device`` at once, the rest going to ``offload_dir`` (files, removed afterwards) or, on
    CUDA without it, to host memory (:mod:`vmq.activations`). Neither changes the result.
    ``dist``: this process's place under torch.distributed (default: the initialised process group,
    if any): every process passes the same arguments (``images``: the whole set) and works on its
    shard of the calibration and eval images (:mod:`vmq.distributed`); all get the same model and
    results, and only rank 0 (``dist.is_main``) should save. The budget is per process.
    ``progress_dir``: keep each finished block there (:mod:`vmq.progress`; ``save`` removes it);
    ``resume``: continue from what it holds (made with this recipe, model, calibration images and
    given stats, else refused). Without ``resume`` an existing ``progress_dir`` is refused. Under
    torch.distributed rank 0 keeps it, and a run may be resumed with another number of processes.
    """
    dist = dist if dist is not None else Dist.current()
    progress = progress if dist.is_main else no_progress
    recipe = read_recipe(recipe, overrides)
    stage_key = stage_of(recipe)
    method = method_for(stage_key, getattr(recipe, stage_key))
    dev = resolve_device(device, recipe)
    budget = MemoryBudget.of(max_memory, offload_dir)
    budget.check(dev)
    start = time.perf_counter()
    if model is None:
        model = load_model(recipe.model.name, recipe.model.checkpoint)
    if getattr(model, "vmq_name", None) is None:
        raise VmqError("the model has no registered name: build it with timm.create_model(<registered name>) or "
                       "vmq.models.create_model, so that the packed file can name it")
    recipe.model.name = model.vmq_name  # the resolved recipe names what actually ran
    family = family_of(model)
    stage = getattr(recipe, stage_key)
    if stage.targets is None:
        stage.targets = family.default_targets()
    method.targets(model, family)  # a bad target list fails before any work
    given_stats = stats is not None
    if given_stats:
        stats.check(model)
    source, cal = "(given)", recipe.calibration
    part = Part.of(dist, cal.num_images if images is None else int(images.shape[0]), cal.batch_size)
    if images is None:
        images, source = calibration_images(model, cal.data, cal.num_images, slice(part.start, part.stop))
    else:
        images = images[part.start:part.stop]
    kept = None
    if progress_dir is not None:
        command = "quantize" if stage_key == "quantization" else "vq"
        kept = ProgressStore.open(progress_dir, compress_identity(command, recipe, model, images, stats,
                                                                  len(family.blocks(model)), part), resume, dist)
    model.to(dev)
    with ActivationStore(dev, budget) as store:
        if stats is None:
            with progress("calibration statistics", len(family.blocks(model))) as update:
                stats = collect_stats(model, images, cal.batch_size, data=source,
                                      on_block=lambda i, n: update(i, n), store=store, dist=dist)
        fp = _evaluate(model, recipe, "floating point", progress, dist) if evaluate_model else None
        t0 = time.perf_counter()
        with progress(f"{method.what.replace('quantized', 'quantizing')} blocks ({method.name})",
                      len(family.blocks(model))) as update:
            reports = compress_model(model, method, images, stats, cal.batch_size, recipe.seed,
                                     on_block=lambda i, n, _p: update(i, n), store=store, part=part,
                                     progress=kept)
        seconds = time.perf_counter() - t0
    q = _evaluate(model, recipe, method.what, progress, dist) if evaluate_model else None
    metrics = _comparison(recipe, fp, q, part.total, source, stats if given_stats else None, dist)
    return CompressResult(model, recipe, method, reports, metrics, seconds,
                          {"total_seconds": time.perf_counter() - start}, store.report(), kept)


def _evaluate(model: nn.Module, recipe: Recipe, what: str, progress: Progress, dist: Dist) -> dict:
    ev = recipe.eval
    loader, _, _ = eval_loader(model, ev.data, ev.batch_size, ev.limit)
    loader = shard_loader(loader, dist)
    with progress(f"evaluating {what}", len(loader.dataset)) as update:
        return evaluate(model, loader, on_batch=update, keep_logits=True, dist=dist)


def _comparison(recipe: Recipe, fp: Optional[dict], q: Optional[dict], num_images: int, source: str,
                stats: Optional[CalibStats], dist: Dist) -> Dict[str, Any]:
    return {
        "fp_top1": None if fp is None else fp["top1"],
        "quant_top1": None if q is None else q["top1"],
        "fp_top5": None if fp is None else fp["top5"],
        "quant_top5": None if q is None else q["top5"],
        "eval_images": None if q is None else q["num_images"],
        **({"top1_agreement": None, "logit_snr_db": None} if q is None else agreement(fp["logits"], q["logits"], dist)),
        "eval_data": recipe.eval.data or "(shipped CIFAR-10 lossless test subset)",
        "calibration_images": num_images,
        "calibration_data": source,
        "stats": None if stats is None else {k: stats.meta.get(k) for k in ("data", "num_images", "weights_sha256")},
        "warnings": [RANDOM_WEIGHTS_WARNING] if recipe.model.checkpoint == RANDOM_WEIGHTS else [],
    }


__all__ = ["compress", "CompressResult", "read_recipe", "load_model", "resolve_device", "recipe_path_for",
           "stage_of", "RANDOM_WEIGHTS"]
