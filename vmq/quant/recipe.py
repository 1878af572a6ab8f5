"""The PTQ recipe: which layers, which scheme, which method.

Grammar (llm-compressor style: one stage with ``targets``, ``ignore`` and ``scheme``)::

    quantization:
      method: ptq4vm            # a registered method: rtn | smoothquant | pts | ptq4vm
      targets: null             # exact names or re: patterns; null: the model family's default targets
      ignore: []                # exact names or re: patterns
      scheme:                   # or a preset string: W8A8, W6A6, W4A8, W4A4, W8A16, W4A16
        weights: {num_bits: 4, strategy: channel}
        input_activations: {num_bits: 8, strategy: token_static}
      smoothing: {alpha: 0.5}
      truncation: {p: 2.4, grid: 100, num_images: 256}
      jlss: {iterations: 100, batch_size: 64, lr_scale: 1e-3, lr_smooth: 1e-2, holdout: 0.25, ...}

What each method runs (the blocks of the steps it does not run are ignored):

============  =========  ==========  ====
method        smoothing  truncation  JLSS
============  =========  ==========  ====
rtn           no         no          no
smoothquant   yes        no          no
pts           yes        yes         no
ptq4vm        yes        yes         yes
============  =========  ==========  ====
"""

from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, field_validator

from vmq.recipe import ActivationScheme, Recipe, StageSpec, StrictModel

PRESETS = {
    "W8A8": (8, 8),
    "W6A6": (6, 6),
    "W4A8": (4, 8),
    "W4A4": (4, 4),
    "W8A16": (8, None),
    "W4A16": (4, None),
}


class WeightScheme(StrictModel):
    num_bits: int = Field(8, ge=2, le=8, description="bits per weight (symmetric integers)")
    strategy: Literal["channel", "tensor"] = "channel"


class Scheme(StrictModel):
    weights: WeightScheme = WeightScheme()
    input_activations: Optional[ActivationScheme] = ActivationScheme()


class Smoothing(StrictModel):
    alpha: float = Field(0.5, ge=0.0, le=1.0, description="migration strength: s = max|x|^a / max|w|^(1-a)")


class Truncation(StrictModel):
    p: float = Field(2.4, gt=0.0, description="exponent of the Lp error the clipping range minimises")
    grid: int = Field(100, ge=2, le=10_000, description="candidate clipping ratios")
    num_images: int = Field(256, ge=1, description="calibration images the activation search looks at (at most "
                                                  "the calibration set)")


class JLSS(StrictModel):
    iterations: int = Field(100, ge=1, description="optimisation steps per block")
    batch_size: int = Field(64, ge=1, description="images per step (cycling over the calibration set)")
    lr_scale: float = Field(1e-3, gt=0.0, description="learning rate of the weight and activation step sizes")
    lr_smooth: float = Field(1e-2, gt=0.0, description="learning rate of the (log) smoothing scales")
    weight_decay: float = Field(1e-5, ge=0.0)
    grad_clip: Optional[float] = Field(2.0, gt=0.0)
    target: Literal["fp_input", "quant_input"] = Field(
        "fp_input", description="the floating-point block fed floating-point inputs (PTQ4VM: learn to compensate "
                                "earlier blocks' error) or the quantized model's inputs (match this block only)")
    loss: Literal["cosine", "mse", "cosine+mse", "logit-weighted"] = Field(
        "logit-weighted", description="block-output loss: 1 - cosine per token (PTQ4VM), relative MSE, their sum, "
                                      "or the squared error weighted by how much each output element moves the "
                                      "logits (through the later floating-point blocks and the head)")
    logit_probes: int = Field(16, ge=1, le=4096, description="backward passes per calibration batch for the "
                              "logit-weighted loss's weights: one per class (exact) when the model has at most this "
                              "many classes, else this many random +-1 combinations of the classes (an estimate)")
    holdout: float = Field(0.25, ge=0.0, lt=1.0, description="share of the calibration images (the last whole "
                           "calibration batches) learning does not use; the parameters that did best on them (see "
                           "select) are kept (0: the last step's unless worse than the start)")
    check_every: int = Field(10, ge=1, description="steps between two held-out checks")
    select: Literal["logits", "block"] = Field(
        "logits", description="what the held-out check compares with floating point: the model's logits (this "
                              "block quantized, the blocks after it still floating point) or the block loss")


class QuantizationStage(StageSpec):
    method: str = Field("ptq4vm", description="a registered PTQ method: rtn, smoothquant, pts, ptq4vm")
    scheme: Scheme = Scheme()
    smoothing: Smoothing = Smoothing()
    truncation: Truncation = Truncation()
    jlss: JLSS = JLSS()

    @field_validator("scheme", mode="before")
    @classmethod
    def _preset(cls, v):
        if isinstance(v, str):
            key = v.strip().upper()
            if key not in PRESETS:
                raise ValueError(f"unknown scheme preset {v!r}; presets: {', '.join(PRESETS)}")
            w, a = PRESETS[key]
            return {"weights": {"num_bits": w}, "input_activations": None if a is None else {"num_bits": a}}
        return v


class QuantRecipe(Recipe):
    quantization: QuantizationStage = QuantizationStage()


def scheme_label(stage: QuantizationStage) -> str:
    """``W4A8`` style label of a stage's scheme."""
    a = stage.scheme.input_activations
    return f"W{stage.scheme.weights.num_bits}A{a.num_bits if a else 16}"


__all__ = ["QuantRecipe", "QuantizationStage", "Scheme", "WeightScheme", "ActivationScheme", "Smoothing",
           "Truncation", "JLSS", "PRESETS", "scheme_label"]
