"""A Lightning callback the side-by-side benchmarks add to train.py runs (`+callbacks.bench_clock=...`).

It appends one JSON line per event to $MICROGPT_BENCH_CLOCK, with wall-clock times (time.time(), so the
harness can subtract the moment it started the process):
  {"event": "first_step", "t": ...}                         the first training step starts
  {"event": "step", "step": k, "t": ...}                    a training step ended (for median step times)
  {"event": "val", "step": k, "t": ..., "val_loss": ...}    a validation ended
Validation time is excluded from step times by the harness (it knows which steps a validation followed).
"""

from __future__ import annotations

import json
import os
import time

import lightning as L


class Clock(L.Callback):
    def __init__(self) -> None:
        self.path = os.environ["MICROGPT_BENCH_CLOCK"]
        self.started = False
        self.events: list[dict] = []

    def _emit(self, **event) -> None:
        self.events.append(event)

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if not self.started:
            self.started = True
            self._emit(event="first_step", t=time.time())

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self._emit(event="step", step=trainer.global_step, t=time.time())

    def on_validation_end(self, trainer, module) -> None:
        if trainer.sanity_checking:
            return
        val = trainer.callback_metrics.get("val_loss")
        self._emit(event="val", step=trainer.global_step, t=time.time(), val_loss=float(val))

    def on_fit_end(self, trainer, module) -> None:
        # written once at the end: no file I/O inside the timed steps
        with open(self.path, "w") as f:
            for e in self.events:
                f.write(json.dumps(e) + "\n")
