"""Small real files for the file-format tests: a packed file (integer and VQ), calibration stats and a
floating-point checkpoint of the tiny Vim, and a helper that rewrites a packed file's metadata."""

import json
from pathlib import Path
from typing import Callable, Dict

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import vmq
from vmq.calib import collect_stats

W4A8 = {"quantization": {"method": "rtn", "scheme": "W4A8"}}
VQ = {"vq": {"method": "kmeans", "codebook": {"dim": 2, "size": 4}, "kmeans": {"iterations": 3}}}


def tiny_model():
    torch.manual_seed(0)
    model = timm.create_model("test_vim").eval()
    return model, torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def write_files(folder: Path) -> Dict[str, Path]:
    """``packed`` (W4A8), ``vq`` (2-bit VQ), ``stats`` and ``checkpoint`` files in ``folder``."""
    out = {}
    for key, recipe in (("packed", W4A8), ("vq", VQ)):
        model, images = tiny_model()
        result = vmq.compress(recipe, model=model, images=images, evaluate_model=False)
        out[key] = folder / f"{key}.safetensors"
        result.save(out[key])
    model, images = tiny_model()
    with torch.no_grad():
        stats = collect_stats(model, images, batch_size=8)
    out["stats"] = folder / "stats.safetensors"
    stats.save(out["stats"])
    out["checkpoint"] = folder / "checkpoint.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out["checkpoint"]))
    return out


def rewrite_meta(src: Path, dst: Path, change: Callable[[dict], object]) -> Path:
    """Copy packed file ``src`` to ``dst`` with ``change`` applied to its vmq metadata (same tensors);
    ``change`` edits the dict in place, or returns a replacement (any JSON value, or a raw string)."""
    with safe_open(str(src), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(f.metadata()["vmq"])
    new = change(meta)
    new = meta if new is None else new
    save_file(tensors, str(dst), metadata={"vmq": new if isinstance(new, str) else json.dumps(new)})
    return dst
