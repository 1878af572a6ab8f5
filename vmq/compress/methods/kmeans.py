"""k-means VQ (the baseline): importance-weighted k-means codebooks, each sub-vector stored as its
nearest codeword; no search."""

from vmq.compress.methods.base import register_method
from vmq.compress.methods.vector import VectorMethod


@register_method
class KMeansVQ(VectorMethod):
    name = "kmeans"
