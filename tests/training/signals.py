"""Callbacks that stop a fit from outside, for tests: announce each step, or signal this process."""

from __future__ import annotations

import os
import signal
import sys

import lightning as L


class Announce(L.Callback):
    """Writes `lmm-test step N` to stderr after each training step (a test waits for it)."""

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        sys.stderr.write(f"lmm-test step {trainer.global_step}\n")
        sys.stderr.flush()


class SendSignal(L.Callback):
    """Sends this process `signals` (names, e.g. `[SIGINT]`) after training step `at_step`."""

    def __init__(self, signals: list[str], at_step: int = 1):
        """
        Args:
            signals: signal names, sent in order.
            at_step: the global step after which they are sent.
        """
        self.signals = [getattr(signal, name) for name in signals]
        self.at_step = at_step

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            for sig in self.signals:
                os.kill(os.getpid(), sig)
