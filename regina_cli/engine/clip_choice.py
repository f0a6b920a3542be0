"""Whether `regina predict` sets negative predicted values to 0 by default (`clip_predictions`).

Residual decoding adds each condition's change to real control cells, so a gene's zeros go
negative where it falls. Whether setting them to 0 helps the predicted mean change differs
between screens (benchmarks/README.md, "Negative predicted values"), so each run decides on the
conditions it predicted without having seen them: its validation conditions at the kept epoch
and, where the untrained model had seen nothing of them (`cross_fitted_start`), its perturbed
training conditions predicted before training from the expression prior fitted without each. A
split's validation set can be a single predictable condition (Papalexi's); the training
conditions add tens.
"""

from __future__ import annotations

import math

from regina_cli.config import GANConfig
from regina_cli.engine.gan_validation import ValidationScores

VALIDATION = "validation"
TRAINING_HELD_OUT = "training_held_out"
LABELS = {VALIDATION: "validation", TRAINING_HELD_OUT: "training conditions the prior left out"}


def cross_fitted_start(g: GANConfig) -> bool:
    """Whether the untrained model predicts each training condition without having seen its cells:
    with an expression prior (cross-fitted for training conditions) and nothing else fitted on
    them (gene prompts start small, no learned feature map, the encoder prompt at its raw scale)."""
    return (g.expression_prior != "none" and g.learned_prompt_init == "small" and g.gene_features == "none"
            and g.prompt_scale == "raw")


def evidence(validation: ValidationScores | None, n_validation: int,
             held_out: tuple[ValidationScores, int] | None) -> dict[str, dict]:
    """{source: {conditions, pearson_delta, pearson_delta_clipped}} for each source that scored both."""
    sources = {VALIDATION: (validation, n_validation) if validation is not None else None,
               TRAINING_HELD_OUT: held_out}
    found = {}
    for name, source in sources.items():
        if source is None:
            continue
        scores, n = source
        if n and math.isfinite(scores.pearson_delta) and math.isfinite(scores.pearson_delta_clipped):
            found[name] = {"conditions": n, "pearson_delta": scores.pearson_delta,
                           "pearson_delta_clipped": scores.pearson_delta_clipped}
    return found


def clip_chosen(found: dict[str, dict]) -> bool:
    """Clip when the clipped predictions score higher pooled over every condition of `found`
    (each source's mean pearson_delta gain weighted by its conditions)."""
    gain = sum(e["conditions"] * (e["pearson_delta_clipped"] - e["pearson_delta"]) for e in found.values())
    return gain > 0
