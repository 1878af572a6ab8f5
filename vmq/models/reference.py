"""The architecture of vmq's shipped reference model (a Vim-Ti-style Vim sized for 32x32 CIFAR-10)."""

from vmq.models.vim import VimConfig

#: Vim-Ti's flags (bimamba v2, middle cls token, mean pool, RMSNorm, fp32 residual, abs pos
#: embed, divide-out), with width, depth and patch size scaled to 32x32 images and a CPU budget.
REFERENCE_CONFIG = VimConfig(
    img_size=32,
    patch_size=4,
    stride=4,
    num_classes=10,
    embed_dim=96,
    depth=6,
    d_state=16,
)

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
