"""When to stop training and which epoch to keep: small rules with a state that checkpoints.

Phase 1 stops on *consistency*: the method stops "if L_cons starts to constantly increase",
i.e. when decoding and re-encoding latents starts to change their class predictions epoch
after epoch, the encoder and decoder are drifting apart. A single rise is noise; `patience`
rises in a row, each larger than `min_delta`, is a trend. Phase 2 stops on the usual patience
rule over its selection metric.
"""

from __future__ import annotations

import math


class ConsistencyStopper:
    """Stop after `patience` consecutive epochs in which L_cons rose by more than `min_delta`,
    never before `min_epochs` epochs."""

    metric = "cons"

    def __init__(self, *, patience: int, min_delta: float, min_epochs: int):
        self.patience, self.min_delta, self.min_epochs = patience, min_delta, min_epochs
        self.previous: float | None = None
        self.rises = 0
        self.reason = ""

    def update(self, epoch: int, value: float) -> bool:
        """Feed the epoch's validation L_cons; True when training should stop now."""
        if self.previous is not None and value > self.previous + self.min_delta:
            self.rises += 1
        else:
            self.rises = 0
        self.previous = value
        if self.rises >= self.patience and epoch >= self.min_epochs:
            self.reason = (f"consistency: validation L_cons rose {self.rises} epochs in a row "
                           f"(by more than {self.min_delta:g} each), stopped after epoch {epoch}")
            return True
        return False

    @property
    def counter(self) -> int:
        return self.rises

    def state_dict(self) -> dict:
        return {"previous": self.previous, "rises": self.rises}

    def load_state_dict(self, state: dict) -> None:
        self.previous, self.rises = state["previous"], state["rises"]


class PatienceStopper:
    """Stop after `patience` epochs without a new best of `metric` (higher is better)."""

    def __init__(self, *, metric: str, patience: int):
        self.metric, self.patience = metric, patience
        self.best = -math.inf
        self.stale = 0
        self.reason = ""

    def update(self, epoch: int, value: float) -> bool:
        if value > self.best:
            self.best, self.stale = value, 0
        else:
            self.stale += 1
        if self.stale >= self.patience:
            best = (f"best of the trained epochs {self.best:.4f}" if math.isfinite(self.best)
                    else "no trained epoch could be kept")
            self.reason = (f"patience: no better validation {self.metric} for {self.stale} epochs "
                           f"({best}), stopped after epoch {epoch}")
            return True
        return False

    @property
    def counter(self) -> int:
        return self.stale

    def state_dict(self) -> dict:
        return {"best": self.best, "stale": self.stale}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.stale = state["best"], state["stale"]


class BestTracker:
    """Which epoch's weights to keep: `mode` "max" or "min" of one validation metric."""

    def __init__(self, metric: str, mode: str):
        if mode not in ("max", "min"):
            raise ValueError(mode)
        self.metric, self.mode = metric, mode
        self.value = -math.inf if mode == "max" else math.inf
        self.epoch = 0

    def update(self, epoch: int, value: float) -> bool:
        """True when this epoch is the new best (NaN never is)."""
        better = value > self.value if self.mode == "max" else value < self.value
        if better and not math.isnan(value):
            self.value, self.epoch = value, epoch
            return True
        return False

    def state_dict(self) -> dict:
        return {"value": self.value, "epoch": self.epoch}

    def load_state_dict(self, state: dict) -> None:
        self.value, self.epoch = state["value"], state["epoch"]
