"""Lightning callbacks for the console and train.log: a step progress bar, a compact model summary and
loss lines (conf/callbacks/default.yaml names them)."""

from __future__ import annotations

import math
import shutil
import sys
import time
import warnings
from typing import Any, TextIO

from lightning.pytorch.callbacks import Callback, ModelSummary, ProgressBar

from microgpt import console
from microgpt.console import fmt_duration, fmt_rate, param_count, progress_log


def _fitting(trainer) -> bool:
    """Inside trainer.fit (validation during fit included; trainer.training is False there)."""
    return getattr(trainer.state.fn, "value", trainer.state.fn) == "fit"


def _scalar(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


class _Throughput:
    """Steps and tokens since training (re)started; the first step (setup, compilation) is not timed."""

    def __init__(self) -> None:
        self.t0: float | None = None
        self.step0 = 0
        self.tokens = 0  # counted after t0
        self.start = time.perf_counter()

    def update(self, trainer, batch: Any) -> None:
        now = time.perf_counter()
        if self.t0 is None:
            self.t0, self.step0 = now, trainer.global_step
            return
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        numel = getattr(x, "numel", None)
        if numel is not None:
            self.tokens += int(numel()) * max(1, trainer.world_size)

    def tokens_per_s(self) -> float:
        if self.t0 is None:
            return math.nan
        dt = time.perf_counter() - self.t0
        return self.tokens / dt if dt > 0 and self.tokens else math.nan

    def eta(self, step: int, max_steps: int) -> float:
        if self.t0 is None or step <= self.step0:
            return math.nan
        per_step = (time.perf_counter() - self.t0) / (step - self.step0)
        return per_step * max(0, max_steps - step)


class StepProgressBar(ProgressBar):
    """`step 1234/2000 ━━━━━━╸━━━ 62% | loss 1.234 | val 1.456 | 5,432 tok/s | 0:41 < ETA 0:25`.

    On a terminal the line is redrawn in place (at most every `refresh_s` seconds) and ended before any
    log message, warning or validation line, so nothing is glued onto it. Anywhere else (a pipe, a file,
    a SLURM log) it prints one plain line every `lines`-th of the run and at the end, without control codes.
    """

    def __init__(self, refresh_s: float = 0.2, lines: int = 20, stream: TextIO | None = None):
        super().__init__()
        self.refresh_s = refresh_s
        self.lines = max(1, int(lines))
        self._stream = stream
        self._enabled = True
        self._open = False  # a partial line is on the terminal
        self._last_draw = 0.0
        self._width = 0
        self.shows_losses = True
        self._loss: float | None = None
        self.speed = _Throughput()

    @property
    def stream(self) -> TextIO:
        return self._stream or sys.stdout

    @property
    def is_tty(self) -> bool:
        try:
            return self.stream.isatty()
        except (AttributeError, ValueError):
            return False

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def break_line(self) -> None:
        """End the bar's line, keeping it (the final state)."""
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False

    def clear_line(self) -> None:
        """Blank the bar's line so that a message takes its place; the next update redraws the bar below."""
        if self._open:
            self.stream.write("\r" + " " * self._width + "\r")
            self.stream.flush()
            self._open = False
            self._width = 0

    def line(self, trainer) -> str:
        step, total = trainer.global_step, trainer.max_steps
        m = trainer.progress_bar_metrics
        parts = [f"step {step}/{total}" if total and total > 0 else f"step {step}"]
        if total and total > 0 and self.is_tty:
            cols = shutil.get_terminal_size((100, 24)).columns
            width = max(10, min(30, cols - 90))
            done = int(width * min(1.0, step / total))
            parts[0] += f" {'━' * done}{'╺' * (width - done)} {100 * step // total:3d}%"
        loss = self._loss if self._loss is not None else _scalar(m.get("train_loss"))
        if loss is not None:
            parts.append(f"loss {loss:.3f}")
        val = _scalar(m.get("val_loss"))
        if val is not None:
            parts.append(f"val {val:.3f}")
        parts.append(fmt_rate(self.speed.tokens_per_s()))
        elapsed = time.perf_counter() - self.speed.start
        parts.append(f"{fmt_duration(elapsed)} < ETA {fmt_duration(self.speed.eta(step, total or 0))}")
        return " | ".join(parts)

    def _draw(self, trainer, final: bool = False) -> None:
        out = getattr(self, "_outputs", None)
        loss = out.get("loss") if isinstance(out, dict) else out
        self._loss = _scalar(loss.detach()) if hasattr(loss, "detach") else None
        text = self.line(trainer)
        if self.is_tty:
            cols = shutil.get_terminal_size((100, 24)).columns
            text = text[: max(20, cols - 1)]
            pad = " " * max(0, self._width - len(text))
            self.stream.write("\r" + text + pad)
            self._width = len(text)
            self._open = True
            if final:
                self.break_line()
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def on_train_start(self, trainer, pl_module) -> None:
        self.speed = _Throughput()
        self._width = 0
        if self._enabled and trainer.is_global_zero:
            console.ACTIVE_BAR = self
            self._showwarning = warnings.showwarning

            def showwarning(*args, **kwargs):  # a warning starts on a fresh line too
                self.clear_line()
                return self._showwarning(*args, **kwargs)

            warnings.showwarning = showwarning

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.speed.update(trainer, batch)
        if not self._enabled or not trainer.is_global_zero:
            return
        # this step's loss (read only when a line is drawn: training_step has already synced it)
        self._outputs = outputs
        step, total = trainer.global_step, trainer.max_steps or 0
        final = total > 0 and step >= total
        if self.is_tty:
            now = time.perf_counter()
            if final or now - self._last_draw >= self.refresh_s:
                self._last_draw = now
                self._draw(trainer, final=final)
        else:
            every = max(1, total // self.lines) if total > 0 else max(1, trainer.log_every_n_steps)
            if final or (step % every == 0 and step != getattr(self, "_printed", -1)):
                self._printed = step
                self._draw(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not self._enabled or not trainer.is_global_zero or trainer.sanity_checking or not _fitting(trainer):
            return
        m = trainer.callback_metrics
        val, bpb = _scalar(m.get("val_loss")), _scalar(m.get("val_bpb"))
        if val is None:
            return
        self.clear_line()
        text = f"step {trainer.global_step}/{trainer.max_steps}: val_loss {val:.4f}"
        if bpb is not None:
            text += f", {bpb:.3f} bits/byte"
        self.stream.write(text + "\n")
        self.stream.flush()

    def _close(self) -> None:
        self.break_line()
        if console.ACTIVE_BAR is self:
            console.ACTIVE_BAR = None
            if hasattr(self, "_showwarning"):
                warnings.showwarning = self._showwarning

    def on_train_end(self, trainer, pl_module) -> None:
        self._close()

    def on_exception(self, trainer, pl_module, exception) -> None:
        self._close()

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._close()


class LossLog(Callback):
    """train_loss (with lr and tokens/s) at each logging step and val metrics at each validation, as lines
    of the `microgpt.progress` logger: into the run's train.log, and on the console when no bar shows them."""

    def __init__(self) -> None:
        self.speed = _Throughput()

    def on_train_start(self, trainer, pl_module) -> None:
        self.speed = _Throughput()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.speed.update(trainer, batch)
        if not trainer.is_global_zero:
            return
        step = trainer.global_step
        every = max(1, trainer.log_every_n_steps)
        if step % every and step != trainer.max_steps:
            return
        if getattr(self, "_logged", None) == step:  # gradient accumulation: one line per optimizer step
            return
        self._logged = step
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        loss = _scalar(loss.detach() if hasattr(loss, "detach") else loss)
        lr = None
        if trainer.optimizers:
            lr = trainer.optimizers[0].param_groups[0].get("lr")
        parts = [f"step {step}/{trainer.max_steps}"]
        if loss is not None:
            parts.append(f"train_loss {loss:.4f}")
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        parts.append(fmt_rate(self.speed.tokens_per_s()))
        progress_log.info(" ".join(parts))

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero or trainer.sanity_checking or not _fitting(trainer):
            return
        m = trainer.callback_metrics
        fields = [(k, _scalar(m.get(k))) for k in ("val_loss", "val_ppl", "val_bpb")]
        text = " ".join(f"{k} {v:.4f}" for k, v in fields if v is not None)
        if text:
            progress_log.info(f"step {trainer.global_step}/{trainer.max_steps} {text}")


class CompactModelSummary(ModelSummary):
    """The model's top-level parts with exact parameter counts (no FLOPs column: Lightning measures FLOPs only
    with an example input, and prints 0 without one); the total matches the `model: N parameters` line."""

    def __init__(self, max_depth: int = 1, stream: TextIO | None = None):
        super().__init__(max_depth=max_depth)
        self._stream = stream

    def on_fit_start(self, trainer, pl_module) -> None:
        if not self._max_depth or not trainer.is_global_zero:
            return
        out = self._stream or sys.stdout
        out.write(self.table(pl_module) + "\n")
        out.flush()

    @staticmethod
    def table(pl_module) -> str:
        model = getattr(pl_module, "model", pl_module)
        rows = []
        for name, child in model.named_children():
            if param_count(child):  # dropout and friends: nothing to count
                rows.append((name, type(child).__name__, param_count(child)))
        extra = [(n, type(c).__name__, param_count(c)) for n, c in pl_module.named_children() if c is not model]
        rows += [(n, t, p) for n, t, p in extra if p]
        total = param_count(pl_module)
        trainable = sum(
            int(getattr(p, "ds_numel", p.numel()))
            for p in {id(p): p for p in pl_module.parameters() if p.requires_grad}.values()
        )
        w_name = max([len(r[0]) for r in rows] + [4])
        w_type = max([len(r[1]) for r in rows] + [4])
        w_n = max(len(f"{total:,}"), 6)
        lines = [f"  {'part':<{w_name}}  {'type':<{w_type}}  {'params':>{w_n}}"]
        lines += [f"  {n:<{w_name}}  {t:<{w_type}}  {p:>{w_n},}" for n, t, p in rows]
        mb = sum(p.numel() * p.element_size() for p in pl_module.parameters()) / 1e6
        lines.append(
            f"  total {total:,} parameters ({trainable:,} trainable, {total - trainable:,} frozen), {mb:.1f} MB"
            + (" (shared weights counted once)" if sum(r[2] for r in rows) != total else "")
        )
        return "\n".join(lines)
