"""Training throughput: microgpt (Lightning) against a plain PyTorch loop over the same GPT, in one process.

    .venv/bin/python bench/throughput.py [--steps N] [--repeats R] [--data PATH]
        [--precision 32-true bf16-mixed] [--compile [off|on|both]] [--full]

For every configuration (precision x compile) and every repeat, it runs, side by side and interleaved:
  lightning  `microgpt.train.run(cfg)` on `experiment=shakespeare_baby callbacks=none logger=none`
  defaults   the same with the experiment's own callbacks and CSV logger (what `train.py` runs)
  plain      a hand-written loop: same GPT, same init, same AdamW groups (fused like LitGPT's), same
             grad clip, same batches (`dm.train_dataset().batch(k)`), same autocast / torch.compile
Throughput = batch * block * steps / time of `steps` optimizer steps after `--warmup` steps (no
validation inside the window). Medians over the repeats are compared with each other and with nanoGPT's
CPU reference (../shared/BENCHMARKS.md). A short `train.py` subprocess gives the peak RSS.

`--full` instead runs the whole 2000-step `experiment=shakespeare_baby` through `train.py` in a subprocess
and reports wall time, peak RSS and val_loss at step 2000 (from metrics.csv).

Results: bench/results/<tag>.json, and bench/results/throughput.md rebuilt from every json there.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import io
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PY = sys.executable

# ../shared/BENCHMARKS.md: nanoGPT's "baby GPT" CPU configuration on this machine (2 threads)
NANOGPT = {"tok_s": 20_100.0, "ms_per_iter": 38.2, "val_loss": 1.8857, "wall_s": 85.0, "rss_mb": 370.0}
TARGET_X = 1.15  # microgpt should reach >= 1.15x nanoGPT's throughput
OVERHEAD_TARGET = 0.03  # Lightning overhead against the plain loop <= 3%

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")


# ---- configuration -----------------------------------------------------------------------------------


def compose(overrides: list[str]):
    """conf/train.yaml composed with overrides, as train.py would (no Hydra run dir)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="train", overrides=overrides)


def overrides_for(data: Path, precision: str, compiled: bool, out_dir: str, max_steps: int, defaults: bool) -> list[str]:
    ov = [
        "experiment=shakespeare_baby",
        f"data.path={data}",
        f"trainer.precision={precision}",
        f"compile={str(compiled).lower()}",
        f"trainer.max_steps={max_steps}",
        # keep validation out of the timed window: the first one would come after max_steps
        f"trainer.val_check_interval={max_steps + 1}",
        "trainer.enable_model_summary=false",
        "print_sample=false",
        f"paths.output_dir={out_dir}",
    ]
    if not defaults:
        ov += ["callbacks=none", "logger=none"]
    return ov


# ---- the two loops ------------------------------------------------------------------------------------


def _step_clock_class():
    import lightning as L

    class StepClock(L.Callback):
        """perf_counter at the end of every training batch, and the last loss."""

        def __init__(self) -> None:
            self.t: list[float] = []
            self.loss = math.nan

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.t.append(time.perf_counter())
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if loss is not None:
                self.loss = float(loss)  # on CPU: no device sync to pay for

    return StepClock


def lightning_run(data: Path, precision: str, compiled: bool, warmup: int, steps: int, defaults: bool) -> dict:
    """microgpt.train.run() on the composed experiment, timed by a callback appended to its callbacks."""
    from omegaconf import OmegaConf

    from microgpt.train import run

    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="bench-lit-") as tmp:
        cfg = compose(overrides_for(data, precision, compiled, tmp, total, defaults))
        OmegaConf.set_struct(cfg, False)
        cfg.callbacks["bench_clock"] = {"_target_": f"{__name__}.StepClock"}
        with contextlib.redirect_stdout(io.StringIO()):
            res = run(cfg)
        trainer = res["trainer"]
        clock = next(c for c in trainer.callbacks if type(c).__name__ == "StepClock")
        opt = trainer.optimizers[0]
        if len(clock.t) != total:
            raise RuntimeError(f"expected {total} timed steps, got {len(clock.t)}")
        dm = trainer.datamodule
        return {
            "seconds": clock.t[-1] - clock.t[warmup - 1],
            "step_s": [b - a for a, b in zip(clock.t[warmup - 1 : -1], clock.t[warmup:])],
            "tokens": steps * dm.batch_size * dm.block_size,
            "final_loss": clock.loss,
            "fused": bool(opt.defaults.get("fused")),
            "groups": [len(g["params"]) for g in opt.param_groups],
            "threads": __import__("torch").get_num_threads(),
        }


def plain_run(cfg, dm, mcfg, precision: str, compiled: bool, fused: bool, warmup: int, steps: int) -> dict:
    """The same training written out by hand (nanoGPT's train.py loop, minus evaluation)."""
    import torch
    import torch.nn.functional as F

    from microgpt.model import build_model

    torch.manual_seed(cfg.seed)  # the same initial weights as LitGPT's model (run() seeds, then builds)
    model = build_model(mcfg)
    model.train()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() >= 2 and "wte" not in name and "wpe" not in name and "emb" not in name
        (decay if is_matrix else no_decay).append(p)
    o = cfg.optimizer
    groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
    params = decay + no_decay
    fwd = torch.compile(model) if compiled else model
    ds = dm.train_dataset()
    s = cfg.scheduler
    lr, min_lr, warm, decay_steps = o.lr, s.min_lr, s.warmup_steps, s.decay_steps
    clip = cfg.trainer.gradient_clip_val
    autocast = precision.startswith("bf16")

    def lr_at(it: int) -> float:  # linear warmup then cosine, as microgpt.lit.lr_lambda
        if it < warm:
            return lr * (it + 1) / (warm + 1)
        if it >= decay_steps:
            return min_lr
        ratio = (it - warm) / max(1, decay_steps - warm)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (lr - min_lr)

    t = []
    loss = None
    for k in range(warmup + steps):
        x, y = ds.batch(k)
        for g in opt.param_groups:
            g["lr"] = lr_at(k)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = fwd(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t.append(time.perf_counter())
    return {
        "seconds": t[-1] - t[warmup - 1],
        "step_s": [b - a for a, b in zip(t[warmup - 1 : -1], t[warmup:])],
        "tokens": steps * dm.batch_size * dm.block_size,
        "final_loss": float(loss),
        "fused": fused,
        "groups": [len(decay), len(no_decay)],
        "threads": torch.get_num_threads(),
    }


def plain_setup(data: Path, precision: str, compiled: bool, total: int):
    """Config, datamodule and GPTConfig built the way microgpt.train.run builds them."""
    from hydra.utils import instantiate

    from microgpt.train import model_config

    cfg = compose(overrides_for(data, precision, compiled, tempfile.gettempdir(), total, False))
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return cfg, dm, model_config(cfg, dm.vocab_size)


# ---- subprocess runs (peak RSS, --full) -------------------------------------------------------------------


def train_subprocess(args: list[str], timeout: float) -> dict:
    """Run train.py with args; wall time, time to the `model:` line (startup), peak RSS via wait4."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [PY, str(ROOT / "train.py"), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    lines: list[str] = []
    marks: dict[str, float] = {}

    def read() -> None:
        for raw in p.stdout:
            line = raw.decode("utf-8", "replace")
            if line.startswith("model:") and "model" not in marks:
                marks["model"] = time.perf_counter()
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = t0 + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            p.kill()
            pid, status, ru = os.wait4(p.pid, 0)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    reader.join(timeout=5)
    return {
        "rc": p.returncode,
        "wall_s": wall,
        "startup_s": marks["model"] - t0 if "model" in marks else math.nan,
        "peak_rss_mb": ru.ru_maxrss / 1024,  # Linux: KiB
        "tail": "".join(lines[-15:]),
    }


def read_metrics(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def full_run(data: Path, precision: str, compiled: bool, timeout: float) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-full-") as tmp:
        args = [
            "experiment=shakespeare_baby",
            f"data.path={data}",
            f"trainer.precision={precision}",
            f"compile={str(compiled).lower()}",
            "print_sample=false",
            f"hydra.run.dir={tmp}",
        ]
        r = train_subprocess(args, timeout)
        rows = read_metrics(Path(tmp) / "metrics.csv") if (Path(tmp) / "metrics.csv").is_file() else []
    vals = [(int(row["step"]), float(row["val_loss"])) for row in rows if row.get("val_loss")]
    r["command"] = " ".join([".venv/bin/python", "train.py", *args[:-1], "hydra.run.dir=<tmp>"])
    r["val_curve"] = vals
    r["val_step"], r["val_loss"] = vals[-1] if vals else (None, math.nan)
    r["best_val_loss"] = min((v for _, v in vals), default=math.nan)
    return r


# ---- reporting ----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    import lightning
    import torch

    return {
        "nproc": os.cpu_count(),
        "cpu": _cpu_model(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "torch_threads": torch.get_num_threads(),
        "loadavg_start": os.getloadavg(),
    }


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def config_tag(precision: str, compiled: bool) -> str:
    return ("fp32" if precision == "32-true" else precision) + ("+compile" if compiled else "")


def rebuild_markdown() -> Path:
    """bench/results/throughput.md from every bench/results/*.json."""
    docs = []
    for f in sorted(RESULTS.glob("*.json")):
        try:
            docs.append(json.loads(f.read_text()))
        except ValueError:
            continue
    lines = [
        "# Training throughput: microgpt vs a plain PyTorch loop vs nanoGPT",
        "",
        "Written by `bench/throughput.py` (see bench/README.md). nanoGPT reference (../shared/BENCHMARKS.md, "
        f"same machine type, quiet): {NANOGPT['tok_s'] / 1000:.1f}k tok/s, {NANOGPT['ms_per_iter']} ms/iter, val "
        f"{NANOGPT['val_loss']} at 2000 iters in {NANOGPT['wall_s']:.0f} s, {NANOGPT['rss_mb']:.0f} MB. Target: "
        f">= {TARGET_X}x nanoGPT = {TARGET_X * NANOGPT['tok_s'] / 1000:.1f}k tok/s; Lightning overhead <= "
        f"{OVERHEAD_TARGET:.0%}.",
        "",
    ]
    for d in sorted(docs, key=lambda d: (d["kind"] != "throughput", d["date"])):
        lines += [f"## {d['title']}", "", f"- command: `{d['command']}`", f"- date: {d['date']}"]
        m = d["machine"]
        lines.append(
            f"- machine: nproc {m['nproc']} ({m['cpu']}), torch {m['torch']}, lightning {m['lightning']}, "
            f"python {m['python']}, torch threads {m['torch_threads']}, load average at start "
            f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}"
        )
        lines += ["", *d["table_md"], ""]
        lines += [f"{n}" for n in d.get("notes", [])]
        lines.append("")
    path = RESULTS / "throughput.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    """Print a rich table; return the same table as markdown lines."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i == 0 else "right")
    for r in rows:
        t.add_row(*r)
    Console().print(t)
    md = ["| " + " | ".join(header) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return md


# ---- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="timed optimizer steps per run (default 200)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (default 20)")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved repeats per runner (default 5)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", DEFAULT_DATA)))
    ap.add_argument("--precision", nargs="+", default=["32-true"], choices=["32-true", "bf16-mixed"])
    ap.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"])
    ap.add_argument("--runners", nargs="+", default=["lightning", "plain", "defaults"],
                    choices=["lightning", "plain", "defaults"], help="which loops to time (default all three)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: the machine's cores)")
    ap.add_argument("--no-rss", action="store_true", help="skip the train.py subprocess that measures peak RSS")
    ap.add_argument("--rss-steps", type=int, default=260, help="steps of that subprocess (260: one val + checkpoint)")
    ap.add_argument("--full", action="store_true", help="run the whole 2000-step experiment via train.py instead")
    ap.add_argument("--timeout", type=float, default=900, help="seconds allowed to a train.py subprocess")
    ap.add_argument("--tag", default=None, help="results file name (default: from the configuration)")
    ap.add_argument("--no-write", action="store_true", help="print only; write nothing under bench/results")
    a = ap.parse_args(argv)
    if a.steps < 1 or a.warmup < 1 or a.repeats < 1:
        ap.error("--steps, --warmup and --repeats must be >= 1")
    if not a.data.is_file():
        ap.error(f"data file {a.data} not found; pass --data PATH or set BENCH_DATA")
    a.data = a.data.resolve()
    return a


def quiet() -> None:
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "microgpt"):
        logging.getLogger(name).setLevel(logging.ERROR)


def command_line() -> str:
    return " ".join([".venv/bin/python", "bench/throughput.py", *sys.argv[1:]])


def fmt_k(x: float) -> str:
    return f"{x / 1000:.2f}k" if math.isfinite(x) else "-"


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    quiet()
    sys.modules.setdefault(__name__, sys.modules[__name__])
    globals()["StepClock"] = _step_clock_class()  # importable as __main__.StepClock by hydra's instantiate
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    mach = machine()
    compiles = {"off": [False], "on": [True], "both": [False, True]}[a.compile]
    configs = [(p, c) for p in a.precision for c in compiles]
    tag = a.tag or ("full-" if a.full else "throughput-") + "_".join(config_tag(p, c) for p, c in configs)

    if a.full:
        return run_full(a, configs, tag, date, mach)

    total = a.warmup + a.steps
    setups = {pc: plain_setup(a.data, pc[0], pc[1], total) for pc in configs}
    runs: dict[tuple, list[dict]] = {(pc, r): [] for pc in configs for r in a.runners}
    fused: dict[tuple, bool] = {}
    for rep in range(a.repeats):
        for pc in configs:
            for r in a.runners:
                t0 = time.perf_counter()
                if r == "plain":
                    cfg, dm, mcfg = setups[pc]
                    if pc not in fused:  # ask LitGPT once what it does
                        fused[pc] = lightning_run(a.data, pc[0], pc[1], 1, 1, False)["fused"]
                    res = plain_run(cfg, dm, mcfg, pc[0], pc[1], fused[pc], a.warmup, a.steps)
                else:
                    res = lightning_run(a.data, pc[0], pc[1], a.warmup, a.steps, r == "defaults")
                    fused.setdefault(pc, res["fused"])
                res["loadavg"] = os.getloadavg()[0]
                runs[(pc, r)].append(res)
                print(
                    f"[{rep + 1}/{a.repeats}] {config_tag(*pc):<18} {r:<9} {res['tokens'] / res['seconds']:>9,.0f} tok/s"
                    f"  loss {res['final_loss']:.4f}  ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )

    rss = None
    if not a.no_rss:
        p, c = configs[0]
        with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
            rss_args = [
                "experiment=shakespeare_baby",
                f"data.path={a.data}",
                f"trainer.precision={p}",
                f"compile={str(c).lower()}",
                f"trainer.max_steps={a.rss_steps}",
                "print_sample=false",
                f"hydra.run.dir={tmp}",
            ]
            rss = train_subprocess(rss_args, a.timeout)
            rss["command"] = " ".join(["train.py", *rss_args[:-1]])
            if rss["rc"] != 0:
                print(rss["tail"], file=sys.stderr)

    header = [
        "config",
        "runner",
        "tok/s",
        "ms/iter",
        "runs (k tok/s)",
        "vs plain",
        "tok/s (median step)",
        "vs plain (median step)",
        "vs nanoGPT",
        "loss@end",
    ]
    rows, summary = [], {}
    for pc in configs:
        tag_pc = config_tag(*pc)
        plain = runs.get((pc, "plain"))
        for r in a.runners:
            rs = runs[(pc, r)]
            tok = [x["tokens"] / x["seconds"] for x in rs]
            step_tok = [x["tokens"] / len(x["step_s"]) / statistics.median(x["step_s"]) for x in rs]
            med, med_step = statistics.median(tok), statistics.median(step_tok)
            vs_plain = vs_plain_step = math.nan
            if plain:  # paired: each run against the plain run of the same repeat, then the median
                p_tok = [x["tokens"] / x["seconds"] for x in plain]
                p_step = [x["tokens"] / len(x["step_s"]) / statistics.median(x["step_s"]) for x in plain]
                vs_plain = statistics.median(u / v for u, v in zip(tok, p_tok))
                vs_plain_step = statistics.median(u / v for u, v in zip(step_tok, p_step))
            ms = 1000 * rs[0]["tokens"] / a.steps / med
            summary[f"{tag_pc}/{r}"] = {
                "tok_s": tok,
                "median_tok_s": med,
                "ms_per_iter": ms,
                "median_step_tok_s": step_tok,
                "median_of_median_step_tok_s": med_step,
                "vs_plain": vs_plain,
                "vs_plain_median_step": vs_plain_step,
                "vs_nanogpt": med / NANOGPT["tok_s"],
                "vs_nanogpt_median_step": med_step / NANOGPT["tok_s"],
                "final_loss": [x["final_loss"] for x in rs],
                "fused_adamw": rs[0]["fused"],
                "param_groups": rs[0]["groups"],
                "threads": rs[0]["threads"],
                "loadavg": [x.get("loadavg") for x in rs],
            }
            f3 = lambda v: f"{v:.3f}" if math.isfinite(v) else "-"  # noqa: E731
            rows.append(
                [
                    tag_pc,
                    r,
                    f"{med:,.0f}",
                    f"{ms:.1f}",
                    " ".join(f"{x / 1000:.1f}" for x in tok),
                    f3(vs_plain),
                    f"{med_step:,.0f}",
                    f3(vs_plain_step),
                    f"{med / NANOGPT['tok_s']:.3f} / {med_step / NANOGPT['tok_s']:.3f}",
                    f"{rs[-1]['final_loss']:.4f}",
                ]
            )
    title = f"microgpt training throughput ({a.steps} steps after {a.warmup} warm-up, median of {a.repeats})"
    md = table(title, header, rows)
    notes = [
        "- runners: `lightning` = `microgpt.train.run` with `callbacks=none logger=none`; `defaults` = the "
        "experiment's own callbacks (RichProgressBar, LearningRateMonitor, ModelCheckpoint) and CSV logger; `plain` "
        "= hand-written loop over the same GPT, batches, AdamW groups and grad clip. Runs interleaved in one process.",
        "- tok/s = tokens of the timed window / its time, median over repeats; `median step` = tokens per step / "
        "the run's median step time (robust to other jobs on a shared machine; nanoGPT's reference is a median "
        "step too). vs plain = median over repeats of (run / plain run of the same repeat): Lightning overhead = "
        f"1 - that. vs nanoGPT = tok/s (window / median step) over {NANOGPT['tok_s']:,.0f} (target >= {TARGET_X}).",
    ]
    losses = {r: [x["final_loss"] for x in runs[(configs[0], r)]] for r in a.runners}
    notes.append(
        "- loss@end is the training loss at the last step; same init, batches and optimizer make the runners agree: "
        + ", ".join(f"{r} {v[-1]:.4f}" for r, v in losses.items())
    )
    if rss is not None:
        notes.append(
            f"- peak RSS of `{rss['command']}` (subprocess, wait4 ru_maxrss): {rss['peak_rss_mb']:.0f} MB "
            f"(nanoGPT {NANOGPT['rss_mb']:.0f} MB); its wall time {rss['wall_s']:.1f} s, of which "
            f"{rss['startup_s']:.1f} s before training (imports, data, model); exit {rss['rc']}"
        )
    for n in notes:
        print(n)
    if not a.no_write:
        doc = {
            "kind": "throughput",
            "title": f"Throughput: {', '.join(config_tag(*pc) for pc in configs)}",
            "command": command_line(),
            "date": date,
            "machine": mach,
            "args": {k: str(v) for k, v in vars(a).items()},
            "nanogpt": NANOGPT,
            "results": summary,
            "rss": rss,
            "table_md": md,
            "notes": notes,
        }
        write(tag, doc)
    return 0


def run_full(a, configs, tag, date, mach) -> int:
    header = ["config", "wall s", "startup s", "val_loss (step)", "best val", "peak RSS MB", "wall vs nanoGPT", "val vs nanoGPT"]
    rows, results = [], {}
    for p, c in configs:
        r = full_run(a.data, p, c, a.timeout)
        if r["rc"] != 0:
            print(r["tail"], file=sys.stderr)
        results[config_tag(p, c)] = r
        rows.append(
            [
                config_tag(p, c),
                f"{r['wall_s']:.1f}",
                f"{r['startup_s']:.1f}",
                f"{r['val_loss']:.4f} ({r['val_step']})",
                f"{r['best_val_loss']:.4f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['wall_s'] / NANOGPT['wall_s']:.3f}",
                f"{r['val_loss'] - NANOGPT['val_loss']:+.4f}",
            ]
        )
    md = table("Full 2000-step experiment=shakespeare_baby via train.py", header, rows)
    notes = [
        f"- nanoGPT: val {NANOGPT['val_loss']} at iter 2000, {NANOGPT['wall_s']:.0f} s wall incl. evals, "
        f"{NANOGPT['rss_mb']:.0f} MB. wall = whole subprocess (imports, tokenizing, 8 evals, checkpoints); startup = "
        "until train.py prints its `model:` line, just before trainer.fit.",
    ]
    for k, r in results.items():
        notes.append(f"- {k}: `{r['command']}`; val curve " + ", ".join(f"{s}:{v:.4f}" for s, v in r["val_curve"]))
    for n in notes:
        print(n)
    if not a.no_write:
        doc = {
            "kind": "full",
            "title": f"Full run: {', '.join(results)}",
            "command": command_line(),
            "date": date,
            "machine": mach,
            "args": {k: str(v) for k, v in vars(a).items()},
            "nanogpt": NANOGPT,
            "results": {k: {kk: vv for kk, vv in v.items() if kk != "tail"} for k, v in results.items()},
            "table_md": md,
            "notes": notes,
        }
        write(tag, doc)
    return 0 if all(r["rc"] == 0 for r in results.values()) else 1


def write(tag: str, doc: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    safe = tag.replace("+", "-").replace("/", "-")
    (RESULTS / f"{safe}.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {RESULTS / f'{safe}.json'} and {rebuild_markdown()}")


if __name__ == "__main__":
    sys.exit(main())
