"""PTQ4VM (Cho et al., "PTQ4VM: Post-Training Quantization for Visual Mamba", WACV 2025): PTS's
smoothing and truncation, then JLSS, block by block: smoothing scales, weight step sizes and
activation step sizes learned jointly against the block output (:mod:`vmq.quant.jlss`)."""

from typing import Any, Dict

from vmq.compress.methods.base import BlockJob, register_method
from vmq.compress.methods.uniform import TruncatingMethod
from vmq.quant.jlss import learn_block, logit_weights


@register_method
class PTQ4VM(TruncatingMethod):
    name = "ptq4vm"

    def needs_logits(self) -> bool:
        cfg = self.stage.jlss
        return cfg.loss == "logit-weighted" or (cfg.holdout > 0 and cfg.select == "logits")

    def prepare(self, job: BlockJob):
        if self.stage.jlss.target == "quant_input":  # this floating-point block on the quantized inputs
            job.target = job.family.block_output(job.run(job.q_io))
        return super().prepare(job)

    def fit(self, job: BlockJob, layers) -> Dict[str, Any]:
        weight = None
        if self.stage.jlss.loss == "logit-weighted":
            weight = logit_weights(job.family, job.fp_out, job.tail, job.fp_logits, job.part, job.activation_store(),
                                   self.stage.jlss.logit_probes, job.seed)
        r = learn_block(job.family, job.block, job.q_io, job.target, layers, self.stage.jlss, job.seed, job.part,
                        job.tail, job.fp_logits, weight)
        return {"loss_before": r.loss_before, "loss_after": r.loss_after, "holdout_before": r.holdout_before,
                "holdout_after": r.holdout_after, "steps_kept": r.steps_kept}
