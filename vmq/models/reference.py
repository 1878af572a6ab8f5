"""vmq's shipped reference model: its name, weights file and data constants (the architecture is
registered in :mod:`vmq.models.vim` as ``vim_ref_cifar10``)."""

REFERENCE_MODEL = "vim_ref_cifar10"
REFERENCE_WEIGHTS = "vim_ref_cifar10.safetensors"

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def cifar_cfg(**kw) -> dict:
    """The pretrained config of a 32x32 CIFAR-10 classifier (the reference model, test variants)."""
    return {"input_size": (3, 32, 32), "crop_pct": 1.0, "interpolation": "bicubic", "mean": CIFAR10_MEAN,
            "std": CIFAR10_STD, "num_classes": 10, "label_names": CIFAR10_CLASSES, "fixed_input_size": True,
            "first_conv": "patch_embed.proj", "classifier": "head", **kw}
