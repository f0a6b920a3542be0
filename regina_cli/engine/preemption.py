"""A stop signal during training: finish the current step, save a resumable checkpoint, exit.

Slurm pre-emption and time limits send SIGTERM (and a grace period) before killing a job, and
`#SBATCH --signal=USR1@120` sends SIGUSR1 ahead of the limit; a user presses Ctrl-C. Each becomes
a flag the training loop checks between steps, so the state saved is consistent. A second Ctrl-C
stops at once, as users expect.
"""

from __future__ import annotations

import signal
import threading

from regina_cli.errors import ReginaError
from regina_cli.io import STOP_SIGNALS, take_pending_stop


class TrainingInterrupted(ReginaError):
    """Training stopped on a signal after saving `last.pt`; the exit code says which signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopOnSignal:
    """Context manager: while active, Ctrl-C and the stop signals (`io.STOP_SIGNALS`) set `.signum`
    instead of killing us; one received before (whose exception was lost, see
    `io.raise_pending_stop`) stops training at its first step."""

    SIGNALS = (*STOP_SIGNALS, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # second Ctrl-C: stop without waiting for the step
        self.signum = signum

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():  # signal() only works there
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
            self.signum = take_pending_stop()
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
