"""RTN: min-max round-to-nearest (the plain baseline). Weight step sizes from max |w| per channel
(or tensor), static activation ranges from the calibration min/max; no smoothing, no learning.
Works weight-only too (``scheme: W4A16``)."""

from vmq.compress.methods.base import register_method
from vmq.compress.methods.uniform import UniformMethod


@register_method
class RTN(UniformMethod):
    name = "rtn"
    needs_activations = False
