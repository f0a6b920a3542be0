"""Training progress: a rich bar with the key losses on a terminal, plain lines in logs.

The loop hands over a callable that returns the running losses; it is called only when the
display refreshes (about twice a second), so reading losses back from the GPU never becomes a
per-step host synchronisation.
"""

from __future__ import annotations

import sys
import time
from typing import Callable

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

from regina_cli.terminal import ReadableConsole

REFRESH_S = 0.5  # rich bar: how often losses are read back
LOG_EVERY_S = 60.0  # plain logs: a mid-epoch line at most this often


def format_losses(losses: dict[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in losses.items())


class TrainingProgress:
    """`mode`: "rich", "plain" or "silent"; "auto" picks rich on a terminal, plain otherwise."""

    def __init__(self, phase: str, *, max_epochs: int, mode: str = "auto", console: Console | None = None):
        self.console = console or ReadableConsole(stderr=True, highlight=False)
        if mode == "auto":
            mode = "rich" if self.console.is_terminal else "plain"
        self.mode, self.phase, self.max_epochs = mode, phase, max_epochs
        self._bar: Progress | None = None
        self._task = None
        self._last_refresh = 0.0
        self._epoch = 0
        self._steps = 0

    def __enter__(self) -> "TrainingProgress":
        if self.mode == "rich":
            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}"),
                console=self.console, transient=True,
            )
            self._bar.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None

    def start_epoch(self, epoch: int, n_steps: int, done: int = 0) -> None:
        self._epoch, self._steps = epoch, n_steps
        self._last_refresh = time.monotonic()
        if self._bar is not None:
            if self._task is not None:
                self._bar.remove_task(self._task)
            self._task = self._bar.add_task(
                f"{self.phase} epoch {epoch}/{self.max_epochs}", total=n_steps, completed=done, losses="")

    def step(self, step: int, losses: Callable[[], dict[str, float]]) -> None:
        """Called after every optimisation step; cheap unless it is time to refresh."""
        if self.mode == "silent":
            return
        now = time.monotonic()
        if self._bar is not None:
            if now - self._last_refresh >= REFRESH_S or step == self._steps:
                self._bar.update(self._task, completed=step, losses=format_losses(losses()))
                self._last_refresh = now
            else:
                self._bar.update(self._task, completed=step)
        elif now - self._last_refresh >= LOG_EVERY_S:
            self.message(f"{self.phase} epoch {self._epoch} step {step}/{self._steps} "
                         f"{format_losses(losses())}")
            self._last_refresh = now

    def end_epoch(self, summary: dict[str, float], note: str = "") -> None:
        if self.mode == "silent":
            return
        line = f"{self.phase} epoch {self._epoch}/{self.max_epochs} {format_losses(summary)}"
        self.message(line + (f" {note}" if note else ""))

    def message(self, text: str) -> None:
        if self.mode == "silent":
            return
        if self.mode == "rich":
            self.console.print(text)
        else:
            print(text, file=sys.stderr, flush=True)
