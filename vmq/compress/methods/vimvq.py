"""ViM-VQ (Deng et al. 2025, "ViM-VQ: Efficient Post-Training Vector Quantization for Visual Mamba"),
vmq's version: from the k-means codebooks, the staged convex-combination codeword search with
incremental confirmation, block by block (:mod:`vmq.vq.incremental`)."""

from typing import Any, Dict, Optional

from vmq.compress.methods.base import BlockJob, register_method
from vmq.compress.methods.vector import VectorMethod
from vmq.vq.incremental import search_block


@register_method
class ViMVQ(VectorMethod):
    name = "vimvq"
    scan = "train"

    def check_stage(self) -> Optional[str]:
        stages = len(self.stage.confirm.schedule) + 1
        if self.stage.search.iterations < stages:
            return (f"search.iterations ({self.stage.search.iterations}) must be at least the number of "
                    f"confirmation stages plus one ({stages})")
        return None

    def fit(self, job: BlockJob, layers) -> Dict[str, Any]:
        before = search_block(job.family, job.block, job.q_io, job.target, layers, self.stage.search,
                              self.stage.confirm.schedule, job.seed, job.part)
        return {"loss_kmeans": before}
