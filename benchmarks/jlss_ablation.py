"""JLSS ablation on the reference model: which loss and target make the quantized model follow FP best.

Quantizes the reference model with PTS (no learning) and with PTQ4VM under several JLSS
settings, all from one set of calibration statistics, and prints, for each, top-1 on the
shipped eval subset, top-1 agreement with the floating-point model and the logit SNR against
it (see ``vmq.evaluate.agreement``). Evaluation uses the fused CPU scan for speed, the same for
every row (and the floating-point baseline), so rows compare with each other.

    python benchmarks/jlss_ablation.py [--schemes W4A8,W6A6] [--variants pts,cosine-fp,mse-fp]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

VARIANTS = {  # name: --set overrides beyond the scheme
    "pts": ["quantization.method=pts"],  # no JLSS
    "cosine-fp": ["quantization.jlss.loss=cosine"],  # the paper's loss and target
    "cosine-fp-lr5": ["quantization.jlss.loss=cosine", "quantization.jlss.lr_scale=2e-4",
                      "quantization.jlss.lr_smooth=2e-3"],
    "mse-fp": ["quantization.jlss.loss=mse"],  # vmq's default
    "cosmse-fp": ["quantization.jlss.loss=cosine+mse"],
    "cosine-qin": ["quantization.jlss.loss=cosine", "quantization.jlss.target=quant_input"],
    "mse-qin": ["quantization.jlss.loss=mse", "quantization.jlss.target=quant_input"],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--schemes", default="W4A8,W6A6")
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the list above")
    args = ap.parse_args()

    from vmq.calib import collect_stats
    from vmq.compress import compress_model, method_for
    from vmq.data import calibration_images, eval_loader
    from vmq.evaluate import evaluate
    from vmq.metrics import agreement
    from vmq.models import create_model, family_of
    from vmq.ops.scan_train import available
    from vmq.quant.recipe import QuantRecipe
    from vmq.recipe import parse_recipe

    if not available():
        raise SystemExit("the fused CPU training scan is not built (make install builds vmq._C)")
    torch.set_grad_enabled(False)
    base = create_model()
    images, _ = calibration_images(base, None, 256)
    stats = collect_stats(base, images, 64)
    loader, _, _ = eval_loader(base, None, 128)

    def run_eval(model):  # evaluated on the training scan, as the ablation was first measured
        family = family_of(model)
        with family.scan_implementation(model, "train"):
            return evaluate(model, loader, keep_logits=True)

    fp = run_eval(copy.deepcopy(base))
    print(f"floating point: top-1 {fp['top1']:.2f} % on {fp['num_images']} images")
    print("| scheme | variant | top-1 % | agreement % | logit SNR dB | quantize s |")
    print("|---|---|---:|---:|---:|---:|")
    for scheme in args.schemes.split(","):
        for name in args.variants.split(","):
            recipe = parse_recipe({}, QuantRecipe, [f"quantization.scheme={scheme}", *VARIANTS[name]])
            model = copy.deepcopy(base)
            start = time.perf_counter()
            compress_model(model, method_for("quantization", recipe.quantization), images, stats, 32, recipe.seed)
            seconds = time.perf_counter() - start
            q = run_eval(model)
            a = agreement(fp["logits"], q["logits"])
            print(f"| {scheme} | {name} | {q['top1']:.2f} | {a['top1_agreement']:.2f} | {a['logit_snr_db']:.2f} "
                  f"| {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
