"""How much of the learned correction predictions keep, chosen per run (`gan.correction_choice`).

A prediction decodes the anchor latent E(X_ctrl + prior) moved by `gan.correction_scale` times the
transition's move. Whether that move helps depends on the screen: on McFaline, whose targets are
known only through gene knowledge, it cost 0.014 on validation (0.715 against 0.729); on the demo
it changes nothing; on Papalexi it helps in some runs and not in others (benchmarks/README.md,
"Keeping the correction or the prior alone"). So before training each run scores the untrained
model at the configured scale and at 0 (the prior alone) on the conditions it predicts without
having seen them, as `clip_choice` does: its validation conditions and, where the untrained model
saw nothing of them, its training conditions predicted from the prior fitted without each. It
keeps 0 where that scores higher pooled over every such condition. The transition then moves no
prediction, so phase 2 trains nothing (the untrained start, validated as epoch 0, is the model);
otherwise it trains and validates at the configured scale.
"""

from __future__ import annotations

import math

from regina_cli.engine.clip_choice import TRAINING_HELD_OUT, VALIDATION

PRIOR_ALONE = "the prior alone kept, which training cannot change: nothing trained"


def _score(phase, held_out: bool) -> tuple[dict[str, tuple[float, int]], tuple | None]:
    """({source: (mean pearson_delta, conditions)} of the model as it is now, and the training
    conditions' whole `cross_fitted_scores` or None)."""
    found = {}
    if phase.val_plan is not None and len(phase.val_plan.conditions):
        found[VALIDATION] = (phase.validation_scores().pearson_delta, len(phase.val_plan.conditions))
    training = phase.cross_fitted_scores() if held_out else None
    if training is not None:
        found[TRAINING_HELD_OUT] = (training[0].pearson_delta, training[1])
    return {k: v for k, v in found.items() if math.isfinite(v[0]) and v[1]}, training


def choose_correction(phase, *, held_out: bool) -> tuple[dict, tuple | None]:
    """Set `phase.gan.correction_scale` to the configured scale or 0, whichever scores higher on
    the pooled evidence (ties keep the configured one). Returns the choice with its evidence, and
    the training conditions' `cross_fitted_scores` at the chosen scale (the start `clip_choice`
    weighs, so train-gan need not score them again). `held_out`: the untrained model saw nothing
    of the training conditions (`cross_fitted_start`)."""
    scale = phase.gan.correction_scale
    configured = float(scale)
    kept, kept_training = _score(phase, held_out)
    scale.fill_(0.0)
    alone, alone_training = _score(phase, held_out)
    shared = set(kept) & set(alone)
    gain = sum(alone[k][1] * (alone[k][0] - kept[k][0]) for k in shared)
    chosen = 0.0 if shared and gain > 0 else configured
    scale.fill_(chosen)
    evidence = {k: {"conditions": kept[k][1], "pearson_delta": kept[k][0],
                    "pearson_delta_prior_alone": alone[k][0]} for k in sorted(shared)}
    record = {"correction_scale": chosen, "configured": configured, "evidence": evidence}
    return record, alone_training if chosen == 0 else kept_training


def prior_alone(record: dict | None) -> bool:
    """Whether a `choose_correction` record kept 0 (None: no choice was made)."""
    return record is not None and record["correction_scale"] == 0
