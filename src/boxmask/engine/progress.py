"""Training progress for logs: plain lines instead of a progress bar when the output is not a terminal.

A tqdm bar redraws itself with ``\\r``; in a file (``nohup``, a cluster job's log) every redraw
stays, thousands per run. :class:`PlainProgressLog` prints one line every ``every`` steps instead.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import TextIO

import lightning as L
import torch

__all__ = ["PlainProgressLog", "format_duration"]


def format_duration(seconds: float) -> str:
    """``H:MM:SS`` (``M:SS`` under an hour); ``?`` for an unknown or infinite duration."""
    if not seconds == seconds or seconds in (float("inf"), float("-inf")) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class PlainProgressLog(L.Callback):
    """Prints ``step 40/600  loss 1.2345  lr 0.01  2.31 it/s  ETA 4:02`` every ``every`` optimiser steps
    and at the last step (global rank 0 only).

    ``loss`` is the mean training loss over the steps since the previous line, ``it/s`` their rate and
    ``ETA`` the remaining steps at that rate. Losses are summed on their device and read once per line,
    so the callback adds no host-device synchronisation per step.
    """

    def __init__(self, every: int, stream: TextIO | None = None):
        if every < 1:
            raise ValueError(f"PlainProgressLog: every must be >= 1, got {every}")
        self.every = int(every)
        self.stream = stream
        self._reset(0)

    def _reset(self, step: int) -> None:
        self._since_step = step
        self._since_time = time.perf_counter()
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        self._last_printed = -1

    def on_train_start(self, trainer, pl_module):
        """Start the clock at the (possibly resumed) first step."""
        self._reset(int(trainer.global_step))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        """Accumulate the step's loss; print a line on every ``every``-th step and the last."""
        loss = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if isinstance(loss, torch.Tensor):
            self._loss_sum = self._loss_sum + loss.detach().float()
            self._loss_count += 1
        step, total = int(trainer.global_step), int(trainer.max_steps)
        if step == self._last_printed or (step % self.every and step < total):
            return
        if trainer.is_global_zero:
            self._print(trainer, step, total)
        self._reset(step)
        self._last_printed = step

    def _print(self, trainer, step: int, total: int) -> None:
        elapsed = time.perf_counter() - self._since_time
        rate = (step - self._since_step) / elapsed if elapsed > 0 else float("nan")
        parts = [f"step {step}/{total}"]
        if self._loss_count:
            parts.append(f"loss {float(self._loss_sum) / self._loss_count:.4f}")
        if trainer.optimizers:
            parts.append(f"lr {trainer.optimizers[0].param_groups[0]['lr']:.4g}")
        parts.append(f"{rate:.2f} it/s")
        parts.append(f"ETA {format_duration((total - step) / rate if rate > 0 else float('nan'))}")
        print("  ".join(parts), file=self.stream or sys.stdout, flush=True)
