"""Write a reference model's card and metrics from a training run's metrics.json.

    python scripts/model_card.py runs/reference/vim_ref_cifar10/metrics.json vmq/assets

Writes ``<model>.json`` (the figures the tests check) and the card: ``MODEL_CARD.md`` for the
Vim reference model, ``MODEL_CARD_vmamba.md`` for the VMamba one.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip())
    m = json.loads(Path(sys.argv[1]).read_text())
    out = Path(sys.argv[2])
    name = m.get("model", "vim_ref_cifar10")
    weights = out / f"{name}.safetensors"
    size = weights.stat().st_size if weights.is_file() else None
    cfg = m["config"]
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from vmq.models import create_model

    m["params"] = f"{sum(p.numel() for p in create_model(name).parameters()):,}"
    (out / f"{name}.json").write_text(json.dumps({k: m[k] for k in (
        "top1_test_10000", "top1_lossless_1017", "train_wall_s", "epochs", "batch_size", "lr", "weight_decay",
        "warmup_epochs", "label_smoothing", "seed", "threads")} | {"config": cfg, "weights_bytes": size}, indent=2) + "\n")
    if name == "vmamba_ref_cifar10":
        (out / "MODEL_CARD_vmamba.md").write_text(vmamba_card(m, cfg, size))
        return
    from vmq.models.vim import VimConfig

    vc = VimConfig.from_dict(cfg)
    card = f"""# Model card: `vim_ref_cifar10`

vmq's shipped reference model: a Vision Mamba with the Vim-Ti architecture flags, trained by
vmq's own script on CIFAR-10. It is the default model of `vmq eval` and of the compression
commands, so that every command has a real trained model to work on.

## Architecture
`VisionMamba` with bimamba v2 (a separate backward conv1d, x_proj, dt_proj, A_b_log, D_b; the
directions' sum halved), a middle cls token, RMSNorm, an fp32 residual stream, an absolute
position embedding and the cls token as output.

| img | patch / stride | tokens | embed dim | depth | d_inner | d_state | dt_rank | classes | parameters |
|---|---|---|---|---|---|---|---|---|---|
| {vc.img_size} | {vc.patch_size} / {vc.stride} | {vc.num_tokens} | {vc.embed_dim} | {vc.depth} | {vc.d_inner} | {vc.d_state} | {vc.resolved_dt_rank} | {vc.num_classes} | {m['params']} |

## Data
CIFAR-10, 50000 training images and 10000 test images in the official order, stored as JPEG
re-encodings of the original pixels (lossy, about 30 dB PSNR), so accuracy is a few points
below what the same model would reach on the original pixels. 1017 test images (indices
0..1016) are also available as bit-exact originals; they ship with vmq as its eval subset
(`cifar10_test_lossless.npz`, uint8) and are what `vmq eval` uses by default. For
quantization, 512 training images ship as bit-exact originals too
(`cifar10_train_calib.npz`: evenly spaced over the first 1017 images of each of the five
training batches); they are the reference model's default calibration set.

## Training recipe
AdamW (betas 0.9/0.999), lr {m['lr']} with {m['warmup_epochs']} epoch of linear warm-up then cosine decay to 0,
weight decay {m['weight_decay']} (none on norms, biases, A_log, D, cls token, position embedding),
batch {m['batch_size']}, {m['epochs']} epochs, label smoothing {m['label_smoothing']}, gradient-norm clipping at 1.0,
augmentation: random crop with 4-pixel reflect padding and horizontal flip. Input normalised
with the CIFAR-10 mean and std; evaluation at 32x32 without resizing (crop_pct 1.0). Seed {m['seed']}.
fp32 on a CPU ({m['threads']} threads, 2-core AMD EPYC), with vmq's fused C++ selective scan for
the forward and backward passes (`vmq/ops/scan_train.py`, held to the PyTorch reference by tests).

## Results (measured at the end of training)
| set | top-1 |
|---|---|
| CIFAR-10 test, all 10000 images (JPEG) | {m['top1_test_10000']:.2f} % |
| CIFAR-10 test, 1017 bit-exact images (shipped subset) | {m['top1_lossless_1017']:.2f} % |

Training wall time: {m['train_wall_s'] / 60:.1f} minutes ({m['train_wall_s']:.0f} s) for {m['epochs']} epochs, on a machine shared
with other work during the run. Weights: `vim_ref_cifar10.safetensors`, fp32, {size if size is not None else '?'} bytes.

The goal set for this model was at least 85 % top-1 on the test set; a GPU would have allowed
a longer schedule. This CPU run's budget was about two hours.

## Reproduce
```bash
make reference-model DATA=path/to/cifar10     # runs scripts/train_reference.py, resumable
python scripts/model_card.py runs/reference/vim_ref_cifar10/metrics.json vmq/assets
```
The shipped-subset figure is checked by `tests/test_reference.py` (and the full test set when
the CIFAR-10 files are present).
"""
    (out / "MODEL_CARD.md").write_text(card)


def vmamba_card(m: dict, cfg: dict, size) -> str:
    return f"""# Model card: `vmamba_ref_cifar10`

vmq's second shipped reference model: a VMamba with the flags of the released VMamba-T[s1l8]
(`vmambav2v_tiny_224`), trained by vmq's own script on CIFAR-10, so that the PTQ and VQ results
cover a hierarchical family as well as Vim (see the README's tables).

## Architecture
`VMamba` (`vmq/models/vmamba.py`) with SS2D `v05_noz` (no gate; the four-direction cross scan,
row-major, column-major and their reverses, each with its own x_proj, dt_proj, A and D, summed,
then `out_norm` and `out_proj`), `ssm_d_state` {cfg['ssm_d_state']}, `ssm_ratio` {cfg['ssm_ratio']}, a depthwise
{cfg['ssm_conv']}x{cfg['ssm_conv']} conv without bias, MLP blocks (ratio {cfg['mlp_ratio']}, GELU), patch embedding v2 (two strided
3x3 convs), downsampling v3 (a strided 3x3 conv and LayerNorm), LayerNorm head with global
average pooling.

| img | patch | stage grids | dims | depths | classes | parameters |
|---|---|---|---|---|---|---|
| {cfg['img_size']} | {cfg['patch_size']} | 8x8, 4x4, 2x2, 1x1 | {' / '.join(map(str, cfg['dims']))} | {' / '.join(map(str, cfg['depths']))} | {cfg['num_classes']} | {m['params']} |

## Data
The same as `vim_ref_cifar10` (see `MODEL_CARD.md`): CIFAR-10 in the official order as JPEG
re-encodings for training; evaluation on the 1017 bit-exact test images that ship with vmq
(`vmq eval` and the README tables) and on all 10000 test images; the 512 shipped bit-exact
training images are its default calibration set.

## Training recipe
AdamW (betas 0.9/0.999), lr {m['lr']} with {m['warmup_epochs']} epoch of linear warm-up then cosine decay to 0,
weight decay {m['weight_decay']} (none on 1-D parameters: norms, biases, Ds; none on A_logs; the (4, d) dt_projs_bias
was decayed), batch {m['batch_size']}, {m['epochs']} epochs, label smoothing
{m['label_smoothing']}, gradient-norm clipping at 1.0, stochastic depth {cfg['drop_path_rate']}, augmentation: random crop with 4-pixel
reflect padding and horizontal flip. CIFAR-10 mean and std; evaluation at 32x32 (crop_pct 1.0).
Seed {m['seed']}. fp32 on a CPU ({m['threads']} threads, 2-core AMD EPYC), every scan direction through vmq's fused
C++ training scan (`vmq/ops/scan_train.py`).

## Results (measured at the end of training)
| set | top-1 |
|---|---|
| CIFAR-10 test, all 10000 images (JPEG) | {m['top1_test_10000']:.2f} % |
| CIFAR-10 test, 1017 bit-exact images (shipped subset) | {m['top1_lossless_1017']:.2f} % |

Training wall time: {m['train_wall_s'] / 60:.1f} minutes ({m['train_wall_s']:.0f} s) for {m['epochs']} epochs, on a machine shared
with other work during the run. Weights: `vmamba_ref_cifar10.safetensors`, fp32, {size if size is not None else '?'} bytes.

## Reproduce
```bash
make reference-model MODEL=vmamba_ref_cifar10 DATA=path/to/cifar10   # resumable
```
`tests/test_reference.py` checks both figures.
"""


if __name__ == "__main__":
    main()
