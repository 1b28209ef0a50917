"""What a run shows on the console: filters for third-party chatter that says nothing is wrong, the model
size line, and the summaries that end train/export/report/consolidate. The Lightning callbacks (progress
bar, model summary, loss lines for train.log) are in microgpt.progress. Imports no Lightning.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

log = logging.getLogger("microgpt")
# per-step loss lines: always in train.log, on the console only when no progress bar shows them
progress_log = logging.getLogger("microgpt.progress")

# (logger name, start of the message) dropped everywhere: advice and notices with nothing to act on
_DROPPED: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", "💡 Tip"),
    ("lightning.pytorch.utilities.rank_zero", "Trainer already configured with model summary callbacks"),
    # our own TORCHAO_FORCE_SKIP_LOADING_SO_FILES=1 (set to skip CUDA kernels a CPU can't load) triggers this
    ("torchao", "Skipping import of cpp extensions"),
    ("torchao.kernel.intmm", "Warning: Detected no triton"),
    ("torch.utils._pytree", "<enum 'KernelPreference'> is an Enum subclass"),
)
# console only: kept in train.log, not worth a line on the terminal
_FILE_ONLY: tuple[tuple[str, str], ...] = (
    ("lightning.pytorch.utilities.rank_zero", "GPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "TPU available:"),
    ("lightning.pytorch.utilities.rank_zero", "HPU available:"),
    ("lightning.pytorch.accelerators.cuda", "LOCAL_RANK:"),
)


class _Drop(logging.Filter):
    def __init__(self, prefixes: Iterable[str]):
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def quiet() -> None:
    """Filters for known noise, installed once per process before the noisy libraries are imported."""
    for name in {n for n, _ in _DROPPED}:
        logger = logging.getLogger(name)
        if not any(isinstance(f, _Drop) for f in logger.filters):
            logger.addFilter(_Drop(m for n, m in _DROPPED if n == name))
    # Optuna's storage (alembic) announces `setup plugin ...` for each of its plugins at INFO
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Lightning 2.6 on torch >= 2.10: its own use of a deprecated torch API, on every run; nothing to do for us
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


# the progress bar drawing on the terminal now (set by microgpt.progress.StepProgressBar)
ACTIVE_BAR: Any = None


class _ConsoleFilter(logging.Filter):
    """On the console handler only: file-only records out, and a progress bar's line ended before a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = str(record.msg)
        if any(record.name == n and msg.startswith(m) for n, m in _FILE_ONLY):
            return False
        if record.name == progress_log.name and ACTIVE_BAR is not None and ACTIVE_BAR.shows_losses:
            return False
        if ACTIVE_BAR is not None:
            ACTIVE_BAR.clear_line()  # the message takes the bar's line; the bar comes back below it
        return True


def route_console() -> None:
    """Attach the console filter to the root logger's console handlers (Hydra's `console`), not its files."""
    quiet()
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
            if not any(isinstance(f, _ConsoleFilter) for f in h.filters):
                h.addFilter(_ConsoleFilter())


def fmt_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def fmt_rate(tokens_per_s: float) -> str:
    if not math.isfinite(tokens_per_s) or tokens_per_s <= 0:
        return "? tok/s"
    return f"{tokens_per_s:,.0f} tok/s"


def param_count(module) -> int:
    """Parameters, each shared tensor once (DeepSpeed stage 3 shards report their full size)."""
    seen: set[int] = set()
    n = 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += int(getattr(p, "ds_numel", p.numel()))
    return n


def model_line(model, vocab_size: int, tokenizer_name: str) -> str:
    """The one line that states the model's size; the summary table's total is the same number."""
    n = param_count(model)
    return f"model: {n:,} parameters ({n / 1e6:.2f}M), vocab {vocab_size}, tokenizer {tokenizer_name}"


def warmup_steps(warmup: float, max_steps: int) -> int:
    """scheduler.warmup_steps as steps: a value in (0, 1) is a fraction of the run. Warns when warmup takes
    more than half of the run (the learning rate would spend most of it below optimizer.lr)."""
    steps = int(round(warmup * max_steps)) if 0 < warmup < 1 else int(warmup)
    if max_steps > 0 and steps > max_steps / 2:
        share = "all" if steps >= max_steps else f"{100 * steps // max_steps}%"
        log.warning(
            "scheduler.warmup_steps=%s covers %s of this %d-step run, so the learning rate stays below "
            "optimizer.lr for most of it; set scheduler.warmup_steps=0.05 (5%% of the run) or fewer steps",
            warmup,
            share,
            max_steps,
        )
    return steps


def _tokens_per_step(trainer, datamodule) -> int:
    bs = getattr(datamodule, "batch_size", 0) or 0
    block = getattr(datamodule, "block_size", 0) or 0
    return int(bs) * int(block) * max(1, int(trainer.accumulate_grad_batches)) * max(1, trainer.world_size)


def train_summary(result: dict[str, Any], wall_s: float, trainer, datamodule, bytes_per_token: float) -> str:
    """The lines that end a training run: where it went, how it did, what to run next."""
    steps = int(trainer.global_step)
    tokens = steps * _tokens_per_step(trainer, datamodule)
    best = result.get("best_val_loss", math.nan)
    best_ckpt, last_ckpt = result.get("best_ckpt") or "", result.get("last_ckpt") or ""
    lines = ["", "=== run summary ===", f"run dir:      {_short(result['output_dir'])}"]
    if best_ckpt:
        lines.append(f"best ckpt:    {_short(best_ckpt)}")
    if last_ckpt:
        lines.append(f"last ckpt:    {_short(last_ckpt)}")
    if math.isfinite(best):
        bpb = best / math.log(2) / bytes_per_token if bytes_per_token else math.nan
        lines.append(f"best val:     loss {best:.4f}, {bpb:.3f} bits/byte")
    elif math.isfinite(result.get("val_loss", math.nan)):
        lines.append(f"val loss:     {result['val_loss']:.4f}")
    rate = tokens / wall_s if wall_s > 0 else math.nan
    lines.append(f"steps:        {steps}/{trainer.max_steps} in {fmt_duration(wall_s)} ({fmt_rate(rate)})")
    ckpt = best_ckpt or last_ckpt
    if ckpt:
        lines.append(f"next:         python -m microgpt.generate ckpt={_short(ckpt)}")
        lines.append(f"              python -m microgpt.evaluate ckpt={_short(ckpt)}")
    elif result.get("output_dir"):
        lines.append("next:         no checkpoint was written (callbacks.model_checkpoint is off)")
    return "\n".join(lines)


def _short(path: str) -> str:
    """A path relative to the working directory when it is under it (shorter commands to copy)."""
    try:
        rel = os.path.relpath(path)
    except ValueError:
        return str(path)
    return rel if not rel.startswith("..") else str(path)


def summary_block(title: str, rows: list[tuple[str, Any]], next_cmd: str | None = None) -> str:
    """`=== title ===` and aligned `key: value` lines, for export/report/consolidate (printed to stderr, so
    their machine-readable stdout stays one JSON line)."""
    w = max([len(k) for k, _ in rows] + [4]) + 2
    lines = [f"=== {title} ==="] + [f"{k + ':':<{w}}{v}" for k, v in rows]
    if next_cmd:
        lines.append(f"{'next:':<{w}}{next_cmd}")
    return "\n".join(lines)


def print_summary(text: str, stream: TextIO | None = None) -> None:
    out = stream or sys.stdout
    out.write(text + "\n")
    out.flush()
    # the run's train.log keeps the summary too (file handlers only: the console already has it)
    for h in logging.getLogger().handlers:
        if isinstance(h, logging.FileHandler):
            rec = progress_log.makeRecord(progress_log.name, logging.INFO, __file__, 0, text, (), None)
            h.handle(rec)


def dir_size(path: str | os.PathLike) -> int:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def human_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"


def export_summary(result: dict[str, Any]) -> str:
    """After `microgpt.export`: where it went, how big, how to use it."""
    out, fmt = result["out"], result["format"]
    nxt = {
        "safetensors": f"python -m microgpt.generate ckpt={_short(out)}",
        "int8": f"python -m microgpt.generate ckpt={_short(out)}",
        "int4": f"python -m microgpt.generate ckpt={_short(out)}",
        "hf": f"python -c \"import transformers as t; t.AutoModelForCausalLM.from_pretrained('{_short(out)}')\"",
        "gguf": f"llama-cli -m {_short(out)}/<the .gguf file> -p 'Hello'",
    }.get(fmt)
    rows = [
        ("out", out),
        ("format", fmt),
        ("files", ", ".join(sorted(result.get("files") or {}))),
        ("size", f"{human_bytes(result.get('bytes'))} ({result.get('size_vs_fp32', math.nan):.2f}x the fp32 weights)"),
    ]
    return summary_block("export summary", rows, nxt)


def report_summary(report: dict[str, Any]) -> str:
    """After `microgpt.report`: the files, and the smallest model within 5% of the best val loss."""
    models = [m for m in report["models"] if m.get("val_loss") is not None and math.isfinite(m["val_loss"])]
    rows: list[tuple[str, Any]] = [("json", report["json"])]
    if report.get("png"):
        rows.append(("png", report["png"]))
    if models:
        best = min(models, key=lambda m: m["val_loss"])
        rows.append(("best loss", f"{best['label']}: {best['val_loss']:.4f}"))
        sized = [(m.get("quant_bytes") or m.get("fp32_bytes"), m) for m in models]
        ok = [(b, m) for b, m in sized if b and m["val_loss"] <= best["val_loss"] * 1.05]
        if ok:
            b, m = min(ok, key=lambda t: t[0])
            rows.append(("smallest ~best", f"{m['label']}: {human_bytes(b)} within 5% of the best loss"))
    return summary_block("report summary", rows, f"open {report['png']}" if report.get("png") else None)


def consolidate_summary(src: Any, written: Any, step: Any, n: int) -> str:
    rows = [("from", src), ("to", written), ("step", step), ("weights", f"{n:,}")]
    return summary_block("consolidate summary", rows, f"python -m microgpt.evaluate ckpt={_short(str(written))}")
