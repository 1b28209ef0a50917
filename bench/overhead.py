"""Where microgpt's Lightning loop spends time that a plain PyTorch loop does not, step by step.

    .venv/bin/python bench/overhead.py [--steps N] [--threads T] [--model baby|tiny] [--tty] [--out FILE]

One `train.py`-equivalent run (`microgpt.train.run` on `experiment=shakespeare_baby` with the experiment's
callbacks and CSV logger) in which every step, drawn at random, either runs as is (`base`), or with one
thing switched off for that step only, or is replaced by `plain` (two steps of bench/throughput.py's
plain loop, the second one timed). Switches are patches in this process (src/ is not touched):

  no-pbar      RichProgressBar's per-batch hooks (with --tty its console is a terminal, as for a user)
  no-lrmon     LearningRateMonitor's per-batch hook
  no-ckpt      ModelCheckpoint's per-batch hook
  no-log       LitGPT.training_step's `self.log("train_loss", ..., prog_bar=True)`
  no-isfinite  LitGPT.training_step's `torch.isfinite(loss)` check
  no-data      RandomWindows.batch replaced by a version with one reused generator
  no-loggers   the CSV logger (trainer.loggers emptied for the step)
  no-all       all the `no-` switches at once
and two variants that put back what LitGPT no longer does, to show what dropping it saved:
  logall       self.log on every step (LitGPT logs only on the steps whose metrics reach the loggers)
  modsetattr   `_current_fx_name`, which Lightning sets twice per hook call, through nn.Module.__setattr__
               (LitGPT stores it with object.__setattr__)

Because the variants alternate step by step within one run, other jobs on a shared machine slow all of
them alike; each one's median step time against `base`'s is what that part costs per step. Times are
wall (perf_counter) and CPU (process_time, all threads) per step.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

TINY = ["model.n_embd=16", "model.n_head=4"]
SWITCHES = ["pbar", "lrmon", "ckpt", "log", "isfinite", "data", "loggers"]
VARIANTS = ["base", *(f"no-{s}" for s in SWITCHES), "logall", "modsetattr", "no-all", "plain"]
OFF: set[str] = set()  # switches off for the current step


def _noop(*args, **kwargs) -> None:
    return None


def _training_step():
    """src/microgpt/training/lit.py's LitGPT.training_step with `no-log` / `no-isfinite` / `logall` switchable."""
    import math

    from microgpt.errors import TrainingError

    def training_step(self, batch, batch_idx: int):
        out = self.compute_loss(batch)
        loss = out["loss"]
        if "isfinite" not in OFF and not math.isfinite(loss.item()):
            raise TrainingError(f"loss is {loss.item()} at step {self.global_step}")
        log = "log" not in OFF and ("logall" in OFF or self._logging_step())
        if log:
            self.log("train_loss", loss, prog_bar=True)
            for k, v in out.items():
                if k not in ("loss", "logits"):
                    self.log(f"train_{k}", v)
        return loss

    return training_step


def _setattr(orig):
    import torch.nn as nn

    def __setattr__(self, name, value):  # noqa: N807
        if name == "_current_fx_name" and "modsetattr" in OFF:
            nn.Module.__setattr__(self, name, value)
        else:
            orig(self, name, value)

    return __setattr__


def fast_batch(self, k: int):
    """RandomWindows.batch, same batches, without a new torch.Generator per call."""
    import numpy as np
    import torch

    from microgpt.data.datamodule import batch_seed

    d = self.__dict__
    if "_g" not in d:
        d["_g"], d["_ar"], d["_arr"] = torch.Generator(), np.arange(self.block_size + 1), np.asarray(self.data)
    d["_g"].manual_seed(batch_seed(self.seed, k, self.rank))
    ix = torch.randint(len(self.data) - self.block_size, (self.batch_size,), generator=d["_g"])
    w = torch.from_numpy(d["_arr"][ix.numpy()[:, None] + d["_ar"]].astype(np.int64))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def _batch(orig):
    def batch(self, k: int):
        return fast_batch(self, k) if "data" in OFF else orig(self, k)

    return batch


def _define_control(a, schedule: list[str], plain_factory):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint, ProgressBar

    class Control(L.Callback):
        """First callback of the list: times each step (start to next start) and sets the next step's switches."""

        def __init__(self) -> None:
            self.samples: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
            self.cur: str | None = None
            self.k = 0
            self.plain = None
            self.plain_k = 0
            self.loggers = None

        def setup(self, trainer, pl_module, stage: str) -> None:
            trainer.callbacks.remove(self)
            trainer.callbacks.insert(0, self)  # run before the others' on_train_batch_start

        def on_train_start(self, trainer, pl_module) -> None:
            self.plain = plain_factory(bool(trainer.optimizers[0].defaults.get("fused")))
            self.loggers = list(trainer.loggers)
            self.by_switch = {
                "pbar": [
                    (c, ("on_train_batch_start", "on_train_batch_end"))
                    for c in trainer.callbacks
                    if isinstance(c, ProgressBar)
                ],
                "lrmon": [
                    (c, ("on_train_batch_start",)) for c in trainer.callbacks if isinstance(c, LearningRateMonitor)
                ],
                "ckpt": [(c, ("on_train_batch_end",)) for c in trainer.callbacks if isinstance(c, ModelCheckpoint)],
            }
            self.t = (time.perf_counter(), time.process_time())

        def _apply(self, trainer, v: str) -> None:
            OFF.clear()
            if v == "no-all":
                OFF.update(SWITCHES)
            elif v.startswith("no-"):
                OFF.add(v[3:])
            elif v in ("logall", "modsetattr"):
                OFF.add(v)
            for sw, items in self.by_switch.items():
                for cb, hooks in items:
                    for h in hooks:
                        if sw in OFF:
                            cb.__dict__[h] = _noop
                        else:
                            cb.__dict__.pop(h, None)
            trainer.loggers = [] if "loggers" in OFF else self.loggers

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            w, c = time.perf_counter(), time.process_time()
            if self.cur is not None and self.k > a.warmup:
                self.samples[self.cur].append((w - self.t[0], c - self.t[1]))
            v = schedule[self.k] if self.k < len(schedule) else "base"
            self.k += 1
            self.cur = v
            if v == "plain":  # two plain steps, the second timed; this Lightning step is not recorded
                self.plain.step(self.plain_k)
                w0, c0 = time.perf_counter(), time.process_time()
                self.plain.step(self.plain_k + 1)
                self.samples["plain"].append((time.perf_counter() - w0, time.process_time() - c0))
                self.plain_k += 2
                self.cur = None
                v = "base"
            self._apply(trainer, v)
            self.t = (time.perf_counter(), time.process_time())

        def on_train_end(self, trainer, pl_module) -> None:
            OFF.clear()
            self._apply(trainer, "base")

    return Control


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=1500, help="steps of the run (default 1500)")
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--model", choices=["baby", "tiny"], default="baby")
    ap.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    ap.add_argument("--tty", action="store_true", help="RichProgressBar renders as on a terminal (output discarded)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--variants", nargs="+", default=VARIANTS, choices=VARIANTS, help="draw steps from these only")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", tp.DEFAULT_DATA)))
    ap.add_argument("--out", type=Path, default=None, help="write the results as json here")
    a = ap.parse_args(argv)
    a.data = a.data.resolve()
    import torch

    torch.set_num_threads(a.threads)
    import lightning  # noqa: F401  (before quiet(): importing it resets its loggers' levels)

    tp.quiet()
    from omegaconf import OmegaConf

    from microgpt.data.datamodule import RandomWindows
    from microgpt.lit import LitGPT
    from microgpt.train import run

    rng = random.Random(a.seed)
    pool = list(dict.fromkeys(["base", *a.variants]))
    schedule = ["base"] * a.warmup + [rng.choice(pool) for _ in range(a.steps - a.warmup)]
    extra = TINY if a.model == "tiny" else []
    setup = tp.plain_setup(a.data, a.precision, False, a.steps, extra)
    cfg0, dm0, mcfg0 = setup

    def plain_factory(fused: bool):
        return tp.PlainTrainer(cfg0, dm0, mcfg0, a.precision, False, fused)

    globals()["Control"] = _define_control(a, schedule, plain_factory)
    meter = tp.LoadMeter()
    with tempfile.TemporaryDirectory(prefix="bench-ovh-") as tmp:
        ov = tp.overrides_for(a.data, a.precision, False, tmp, a.steps, True) + extra
        if a.tty:
            ov.append("+callbacks.progress_bar.console_kwargs.force_terminal=true")
        cfg = OmegaConf.to_container(tp.compose(ov))  # plain dict: free to add a callback
        cfg["callbacks"]["bench_control"] = {"_target_": f"{__name__}.Control"}
        cfg = OmegaConf.create(cfg)
        orig_step, orig_batch = LitGPT.__dict__["training_step"], RandomWindows.__dict__["batch"]
        LitGPT.training_step = _training_step()
        orig_setattr = LitGPT.__dict__["__setattr__"]
        LitGPT.__setattr__ = _setattr(orig_setattr)
        RandomWindows.batch = _batch(orig_batch)
        meter.start()
        t0 = time.perf_counter()
        try:
            with contextlib.redirect_stdout(io.StringIO()):
                res = run(cfg)
        finally:
            LitGPT.training_step, RandomWindows.batch = orig_step, orig_batch
            LitGPT.__setattr__ = orig_setattr
        wall = time.perf_counter() - t0
    others = meter.others()
    ctl = next(c for c in res["trainer"].callbacks if type(c).__name__ == "Control")
    base_w = statistics.median(w for w, _ in ctl.samples["base"])
    base_c = statistics.median(c for _, c in ctl.samples["base"])
    base_mean = _clipped_mean([w for w, _ in ctl.samples["base"]])
    rows, result = [], {}
    for v in VARIANTS:
        s = ctl.samples[v]
        if not s:
            continue
        mw, mc = statistics.median(w for w, _ in s), statistics.median(c for _, c in s)
        mean = _clipped_mean([w for w, _ in s])
        result[v] = {"n": len(s), "median_wall_ms": 1e3 * mw, "median_cpu_ms": 1e3 * mc, "mean_wall_ms": 1e3 * mean}
        rows.append(
            [
                v,
                str(len(s)),
                f"{1e3 * mw:.2f}",
                f"{1e6 * (base_w - mw):+.0f}" if v != "base" else "",
                f"{100 * (base_w - mw) / base_w:+.2f}%" if v != "base" else "",
                f"{1e3 * mean:.2f}",
                f"{1e6 * (base_mean - mean):+.0f}" if v != "base" else "",
                f"{1e3 * mc:.2f}",
                f"{1e6 * (base_c - mc):+.0f}" if v != "base" else "",
            ]
        )
    title = (
        f"per-step cost, {a.model} model, {a.precision}, {a.threads} thread(s){', tty' if a.tty else ''}: "
        f"{a.steps} steps, others' CPU {100 * others:.0f}%, {wall:.0f} s"
    )
    header = [
        "variant",
        "n",
        "median ms",
        "saved us",
        "saved %",
        "mean ms",
        "saved us (mean)",
        "cpu ms",
        "saved cpu us",
    ]
    md = tp.table(title, header, rows, left=1)
    p = result.get("plain")
    if p:
        print(
            f"base / plain: median {result['base']['median_wall_ms'] / p['median_wall_ms']:.4f}, "
            f"mean {result['base']['mean_wall_ms'] / p['mean_wall_ms']:.4f}, "
            f"cpu {result['base']['median_cpu_ms'] / p['median_cpu_ms']:.4f}"
        )
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "kind": "overhead",
            "command": " ".join(
                [".venv/bin/python", "bench/overhead.py", *(argv if argv is not None else sys.argv[1:])]
            ),
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "machine": tp.machine(),
            "others_cpu": others,
            "wall_s": wall,
            "results": result,
            "table_md": md,
        }
        a.out.write_text(json.dumps(doc, indent=2) + "\n")
        m = doc["machine"]
        a.out.with_suffix(".md").write_text(
            "\n".join(
                [
                    f"# {title}",
                    "",
                    "Written by `bench/overhead.py` (see its docstring and bench/README.md).",
                    "",
                    f"- command: `{doc['command']}`",
                    f"- date: {doc['date']}",
                    f"- machine: nproc {m['nproc']} ({m['cpu']}), torch {m['torch']}, lightning {m['lightning']}, "
                    f"torch threads {m['torch_threads']}; other processes used {100 * others:.0f}% of the CPUs",
                    "",
                    *md,
                    "",
                    "saved = base minus the variant, per step (positive: the switched-off part costs that much). "
                    "The cpu columns (process CPU time) are the steadiest on a busy machine; wall times there "
                    "include waiting for a CPU.",
                    "",
                ]
            )
        )
    return 0


def _clipped_mean(xs: list[float]) -> float:
    """Mean of the steps shorter than 3x the median: keeps periodic work (logging every n steps), drops stalls."""
    m = statistics.median(xs)
    kept = [x for x in xs if x < 3 * m]
    return sum(kept) / len(kept) if kept else math.nan


if __name__ == "__main__":
    sys.exit(main())
