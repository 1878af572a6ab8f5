"""Print how closely vmq's models reproduce the official code's logits on every parity fixture.

    python scripts/parity_report.py [FIXTURES_DIR]      # default ../shared/fixtures

For each fixture: the registered model its official state dict fits (found from the keys), and
max |logits - official| for each input (square, and rect where the fixture has one), with the
inference scan (``vmq.ops.multi_scan``) and with the training scan. The tests
(``tests/test_parity*.py``) hold the same figures to the fixtures' tolerances, features included.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from vmq.models import create_model, family_of, fitting_models


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "fixtures"
    print(f"{'fixture':32} {'model':24} {'input':6} {'max|logit|':>10} {'fused':>9} {'train':>9}")
    for d in sorted(p for p in root.iterdir() if (p / "state_dict.safetensors").is_file()):
        sd = load_file(str(d / "state_dict.safetensors"))
        fits = fitting_models(sd)
        if not fits:  # e.g. a cut-down full-size variant that tests/test_parity.py builds from its config.json
            print(f"{d.name:32} (no registered model fits; see the tests)")
            continue
        name = fits[0]
        model = create_model(name, checkpoint=d / "state_dict.safetensors")
        for suffix in ("", "_rect"):
            if not (d / f"input{suffix}.safetensors").is_file():
                continue
            x = load_file(str(d / f"input{suffix}.safetensors"))["input"]
            ref = load_file(str(d / f"logits{suffix}.safetensors"))["logits"]
            with torch.no_grad():
                fused = (model(x) - ref).abs().max().item()
                with family_of(model).scan_implementation(model, "train"):
                    train = (model(x) - ref).abs().max().item()
            print(f"{d.name:32} {name:24} {suffix.strip('_') or 'square':6} {ref.abs().max().item():10.3f} "
                  f"{fused:9.1e} {train:9.1e}")


if __name__ == "__main__":
    main()
