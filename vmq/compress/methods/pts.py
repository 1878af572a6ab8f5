"""PTS (PTQ4VM's starting point, no learning): smoothing, per-token static activation ranges and
static truncation (weight step sizes and activation ranges minimising the Lp error over a grid)."""

from vmq.compress.methods.base import register_method
from vmq.compress.methods.uniform import TruncatingMethod


@register_method
class PTS(TruncatingMethod):
    name = "pts"
