"""The VQ recipe: which layers, which codebook, which method.

Grammar (one stage with ``targets``, ``ignore``, as in the PTQ recipe)::

    vq:
      method: vimvq             # a registered method: kmeans | vimvq
      targets: null             # exact names or re: patterns; null: the model family's default targets
      ignore: []
      codebook: {dim: 2, size: 16, rows_per_group: null, row_scale: false}
      kmeans: {iterations: 50, importance: true}
      search: {candidates: 4, iterations: 300, batch_size: 16, lr_logits: 0.05, lr_codebook: 1e-4, loss: mse}
      confirm: {schedule: [0.5, 0.75, 0.9, 0.97, 1.0]}
      input_activations: null   # or {num_bits: 8, strategy: token_static}

A weight matrix (N, K_in) is cut into sub-vectors of ``dim`` weights along the input dimension
(the input dimension is zero-padded to a multiple of ``dim``); each sub-vector is stored as the
index of one of ``size`` codewords, so the codes cost ``log2(size) / dim`` bits per weight. The
codebook (fp16) and the optional per-row scale (fp16) are overhead reported separately.

``kmeans`` is the baseline: importance-weighted k-means, codes = nearest codeword. ``vimvq``
starts there and runs the ViM-VQ search block by block: every sub-vector becomes a convex
combination of its ``candidates`` nearest codewords, the combination weights and the codebook
learn against the block's output, and in the stages of ``confirm.schedule`` (cumulative
fractions) the most confident sub-vectors are fixed to their best codeword, until all are; a
last share of the iterations then tunes the codebooks with the final codes.
"""

from __future__ import annotations

import math
from typing import List, Literal, Optional

from pydantic import Field, field_validator, model_validator

from vmq.recipe import ActivationScheme, Recipe, StageSpec, StrictModel

MAX_CODE_BITS = 16


class Codebook(StrictModel):
    dim: int = Field(2, ge=1, le=16, description="weights per sub-vector (d), along the input dimension")
    size: int = Field(16, ge=2, description="codewords per codebook (K, a power of two)")
    rows_per_group: Optional[int] = Field(None, ge=1, description="one codebook per this many output rows; "
                                                                  "null: one per layer")
    row_scale: bool = Field(False, description="divide each output row by its RMS before clustering "
                                               "(one fp16 scale per row)")

    @field_validator("size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"codebook.size must be a power of two (codes are log2(size) bits), got {v}")
        if v.bit_length() - 1 > MAX_CODE_BITS:
            raise ValueError(f"codebook.size is at most 2^{MAX_CODE_BITS}, got {v}")
        return v

    @property
    def code_bits(self) -> int:
        return self.size.bit_length() - 1

    @property
    def bits_per_weight(self) -> float:
        """Bits of the codes per weight, without codebook and scale overhead."""
        return self.code_bits / self.dim


class KMeans(StrictModel):
    iterations: int = Field(50, ge=0, description="Lloyd iterations after k-means++ seeding")
    importance: bool = Field(True, description="weight each coordinate by its input channel's second moment "
                                               "E[x^2] from calibration")


class Search(StrictModel):
    candidates: int = Field(4, ge=2, le=64, description="nearest codewords each sub-vector mixes")
    iterations: int = Field(300, ge=2, description="optimisation steps per block, split evenly over the "
                                                     "confirmation stages plus a last codebook-only stage")
    batch_size: int = Field(16, ge=1, description="images per step (cycling over the calibration set)")
    lr_logits: float = Field(5e-2, gt=0.0, description="learning rate of the combination logits")
    lr_codebook: float = Field(1e-4, gt=0.0, description="learning rate of the codewords")
    loss: Literal["cosine", "mse", "cosine+mse"] = Field("mse", description="block-output loss (as in JLSS)")


class Confirm(StrictModel):
    schedule: List[float] = Field(default_factory=lambda: [0.5, 0.75, 0.9, 0.97, 1.0],
                                  description="cumulative fraction of sub-vectors fixed at the end of each stage")

    @field_validator("schedule")
    @classmethod
    def _increasing(cls, v: List[float]) -> List[float]:
        if not v:
            raise ValueError("confirm.schedule needs at least one stage")
        if any(not 0.0 < f <= 1.0 for f in v) or any(b <= a for a, b in zip(v, v[1:])):
            raise ValueError(f"confirm.schedule must increase strictly within (0, 1], got {v}")
        if v[-1] != 1.0:
            raise ValueError(f"confirm.schedule must end at 1.0 (every sub-vector confirmed), got {v[-1]}")
        return v


class VQStage(StageSpec):
    method: str = Field("vimvq", description="a registered VQ method: kmeans, vimvq")
    codebook: Codebook = Codebook()
    kmeans: KMeans = KMeans()
    search: Search = Search()
    confirm: Confirm = Confirm()
    input_activations: Optional[ActivationScheme] = None

    @model_validator(mode="after")
    def _coherent(self):
        acts = self.input_activations
        if acts is not None and acts.strategy == "token_dynamic":
            raise ValueError("vq.input_activations: VQ layers take static activations (token_static or "
                             "tensor_static), not token_dynamic")
        if self.search.candidates > self.codebook.size:
            raise ValueError(f"search.candidates ({self.search.candidates}) exceeds codebook.size "
                             f"({self.codebook.size})")
        return self


class VQRecipe(Recipe):
    vq: VQStage = VQStage()


def vq_label(stage: VQStage) -> str:
    """``2bit-d2k16`` style label; ``-a8`` when activations are quantized too."""
    cb = stage.codebook
    bits = cb.bits_per_weight
    b = f"{bits:g}bit" if bits == math.floor(bits) else f"{bits:.2f}bit"
    a = stage.input_activations
    return f"{b}-d{cb.dim}k{cb.size}" + (f"-a{a.num_bits}" if a else "")


__all__ = ["VQRecipe", "VQStage", "Codebook", "KMeans", "Search", "Confirm", "vq_label"]
