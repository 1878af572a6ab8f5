"""SmoothQuant (Xiao et al. 2023) as a baseline: per-channel smoothing scales
``s = max|x|^a / max|w|^(1-a)`` moved from the activations into the weights, then min-max
ranges (per-tensor static activations in the shipped recipe); no truncation, no learning."""

from vmq.compress.methods.base import register_method
from vmq.compress.methods.uniform import SmoothingMethod


@register_method
class SmoothQuant(SmoothingMethod):
    name = "smoothquant"
