"""SIGINT/SIGTERM during training: finish the step, write a checkpoint, raise TrainingInterrupted."""
from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("lowbit.train")
# Under torchrun a worker gets the terminal's SIGINT and torchrun's forwarded copy within milliseconds: a second
# SIGINT sooner than this is that copy. A person's quickest double tap takes longer (~0.15 s).
DUPLICATE_WINDOW_S = 0.1


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM stopped the run after a checkpoint of `step` was written (`signum`: the signal)."""

    def __init__(self, signum: int, step: int):
        super().__init__(f"{signal.Signals(signum).name} at step {step}")
        self.signum, self.step = signum, step


class StopRequest:
    """SIGINT/SIGTERM handlers for the training loop: the first signal asks the loop to finish its step, write
    a checkpoint and raise TrainingInterrupted; a second Ctrl-C interrupts at once (KeyboardInterrupt).
    Use as a context manager (handlers installed on enter, the old ones restored on exit)."""

    def __init__(self):
        self.signum: int | None = None
        self._old: dict = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            # Ctrl-C pressed again: stop now. Not a SIGTERM, and under torchrun not the forwarded copy of the first
            torchrun = "TORCHELASTIC_RUN_ID" in os.environ
            if signum == self.signum == signal.SIGINT and not (torchrun and time.monotonic() - self._t
                                                                 < DUPLICATE_WINDOW_S):
                raise KeyboardInterrupt
            return
        self.signum, self._t = signum, time.monotonic()
        log.warning("received %s: finishing this step and writing a checkpoint (Ctrl-C again to stop at once)",
                    signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():  # signal handlers: main thread only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}
