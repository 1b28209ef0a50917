"""Training throughput: microgpt (Lightning) against a plain PyTorch loop over the same GPT, in one process.

    .venv/bin/python bench/throughput.py [--steps N] [--repeats R] [--data PATH]
        [--precision 32-true bf16-mixed] [--compile [off|on|both]] [--runners ...]

For every configuration (precision x compile), repeated R times and interleaved, it runs:
  lightning  `microgpt.train.run(cfg)` on `experiment=shakespeare_baby callbacks=none logger=none
             print_sample=false` (Lightning still adds its default progress bar and checkpoint callback)
  plain      a hand-written loop: the same GPT and initial weights, AdamW parameter groups (fused like
             LitGPT's), LR schedule, grad clip, batches (`dm.train_dataset().batch(k)`), autocast/compile
  paired     the `lightning` run with one `plain` step run inside a callback after every Lightning step:
             both loops are timed step by step under the same machine load, so their ratio is the least
             disturbed by other jobs on a shared machine
  defaults   `run(cfg)` with the experiment's own callbacks and CSV logger (what `train.py` runs)
Throughput = batch * block * steps / time of `steps` steps after `--warmup` (no validation inside the
window). Medians over repeats are compared with each other: the Lightning overhead figure. A short
`train.py` subprocess gives the peak RSS. microgpt against nanoGPT itself (its own code, side by side):
bench/vs_nanogpt.py (`make bench`) and bench/speedrun.py.

Results: bench/results/<tag>.json; bench/results/throughput.md is rebuilt from every json there.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import logging
import math
import os
import platform
import resource
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
RUNNERS = ["lightning", "plain", "paired", "defaults"]

OVERHEAD_TARGET = 0.03  # Lightning overhead against the plain loop <= 3%

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")
# objects handed to callbacks that Hydra instantiates from `callbacks.<name>._target_` (no constructor args)
_HANDOFF: dict[str, Any] = {}


# ---- configuration -----------------------------------------------------------------------------------


def compose(overrides: list[str]):
    """conf/train.yaml composed with overrides, as train.py would (no Hydra run dir)."""
    from hydra import compose as hcompose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hcompose(config_name="train", overrides=overrides)


def overrides_for(
    data: Path, precision: str, compiled: bool, out_dir: str, max_steps: int, defaults: bool
) -> list[str]:
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


def plain_setup(data: Path, precision: str, compiled: bool, total: int, extra: list[str] | None = None):
    """Config, datamodule and GPTConfig built the way microgpt.train.run builds them."""
    from hydra.utils import instantiate

    from microgpt.train import model_config

    cfg = compose(overrides_for(data, precision, compiled, tempfile.gettempdir(), total, False) + (extra or []))
    dm = instantiate(cfg.data)
    dm.setup("fit")
    return cfg, dm, model_config(cfg, dm.vocab_size)


# ---- machine load ------------------------------------------------------------------------------------


class LoadMeter:
    """CPU used by *other* processes while we run: /proc/stat busy time minus this process's own."""

    def __init__(self) -> None:
        self.ncpu = os.cpu_count() or 1
        self.tick = os.sysconf("SC_CLK_TCK")

    def _read(self) -> tuple[float, float, float]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(v[:8]) - v[3] - v[4]) / self.tick  # everything but idle and iowait
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return time.perf_counter(), busy, ru.ru_utime + ru.ru_stime

    def start(self) -> None:
        self._s = self._read()

    def others(self) -> float:
        """Fraction of the machine's CPUs used by other processes since start()."""
        w, b, own = self._read()
        w0, b0, own0 = self._s
        return max(0.0, (b - b0) - (own - own0)) / max(1e-9, (w - w0) * self.ncpu)

    def wait_quiet(self, max_wait: float, threshold: float) -> float:
        """Sleep in 1 s windows until others use < threshold of the machine, at most max_wait s."""
        end = time.perf_counter() + max_wait
        while True:
            self.start()
            time.sleep(1.0)
            x = self.others()
            if x < threshold or time.perf_counter() >= end:
                return x


# ---- the plain loop ------------------------------------------------------------------------------------


class PlainTrainer:
    """nanoGPT's train.py loop (minus evaluation) over microgpt's GPT, one step at a time."""

    decay_embeddings = staticmethod(lambda cfg: bool(cfg.get("decay_embeddings", False)))

    def __init__(self, cfg, dm, mcfg, precision: str, compiled: bool, fused: bool):
        import torch

        from microgpt.model import build_model

        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)  # the initial weights of LitGPT's model (run() seeds, then builds)
            self.model = build_model(mcfg)
        self.model.train()
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():  # LitGPT.configure_optimizers' groups
            is_embedding = "wte" in name or "wpe" in name or "emb" in name
            is_matrix = p.dim() >= 2 and (self.decay_embeddings(cfg) or not is_embedding)
            (decay if is_matrix else no_decay).append(p)
        o = cfg.optimizer
        groups = [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps, fused=fused)
        self.groups = [len(decay), len(no_decay)]
        self.fused = fused
        self.params = decay + no_decay
        self.fwd = torch.compile(self.model) if compiled else self.model
        self.ds = dm.train_dataset()
        s = cfg.scheduler
        self.lr, self.min_lr, self.warm, self.decay_steps = o.lr, s.min_lr, s.warmup_steps, s.decay_steps
        self.clip = cfg.trainer.gradient_clip_val
        self.bf16 = precision.startswith("bf16")
        self.tokens_per_step = dm.batch_size * dm.block_size
        self.loss = math.nan

    def get_batch(self, k: int):
        return self.ds.batch(k)

    def lr_at(self, it: int) -> float:  # linear warmup then cosine to min_lr (microgpt.lit.lr_lambda)
        if it < self.warm:
            return self.lr * (it + 1) / (self.warm + 1)
        if it >= self.decay_steps:
            return self.min_lr
        ratio = (it - self.warm) / max(1, self.decay_steps - self.warm)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)

    def step(self, k: int):
        import torch
        import torch.nn.functional as F

        x, y = self.get_batch(k)
        for g in self.opt.param_groups:
            g["lr"] = self.lr_at(k)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.fwd(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1))
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss


# ---- timing callbacks (Lightning imported lazily) ------------------------------------------------------


def _define_callbacks() -> None:
    """StepClock and PairedPlain, made importable as <this module>.<name> for Hydra's instantiate."""
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

    class PairedPlain(L.Callback):
        """After each Lightning step, one plain step on its own model: two step-time series, side by side."""

        def __init__(self) -> None:
            self.make = _HANDOFF.pop("paired")  # (fused) -> PlainTrainer
            self.plain = None
            self.lit_s: list[float] = []
            self.plain_s: list[float] = []
            self.loss = self.plain_loss = math.nan
            self._last = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            self.plain = self.make(bool(trainer.optimizers[0].defaults.get("fused")))
            self._last = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            t0 = time.perf_counter()
            self.lit_s.append(t0 - self._last)  # everything Lightning did since the previous plain step
            loss = self.plain.step(len(self.plain_s))
            t1 = time.perf_counter()
            self.plain_s.append(t1 - t0)
            self._last = t1
            self.loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
            self.plain_loss = float(loss)

    globals()["StepClock"] = StepClock
    globals()["PairedPlain"] = PairedPlain


# ---- runners -------------------------------------------------------------------------------------------


def lightning_run(data: Path, precision: str, compiled: bool, warmup: int, steps: int, runner: str, setup=None) -> dict:
    """microgpt.train.run() on the composed experiment, timed by a callback added to its callbacks."""
    from omegaconf import OmegaConf

    from microgpt.train import run

    if "StepClock" not in globals():
        _define_callbacks()
    total = warmup + steps
    with tempfile.TemporaryDirectory(prefix="bench-lit-") as tmp:
        cfg = compose(overrides_for(data, precision, compiled, tmp, total, runner == "defaults"))
        OmegaConf.set_struct(cfg, False)
        name = "PairedPlain" if runner == "paired" else "StepClock"
        if runner == "paired":
            c, dm, mcfg = setup
            _HANDOFF["paired"] = lambda fused: PlainTrainer(c, dm, mcfg, precision, compiled, fused)  # noqa: E731
        cfg.callbacks["bench_clock"] = {"_target_": f"{__name__}.{name}"}
        with contextlib.redirect_stdout(io.StringIO()):
            res = run(cfg)
        trainer = res["trainer"]
        cb = next(c for c in trainer.callbacks if type(c).__name__ == name)
        opt = trainer.optimizers[0]
        dm = trainer.datamodule
        out = {
            "tokens": steps * dm.batch_size * dm.block_size,
            "final_loss": cb.loss,
            "fused": bool(opt.defaults.get("fused")),
            "groups": [len(g["params"]) for g in opt.param_groups],
            "threads": __import__("torch").get_num_threads(),
        }
        if runner == "paired":
            if len(cb.lit_s) != total:
                raise RuntimeError(f"expected {total} timed steps, got {len(cb.lit_s)}")
            out["step_s"] = cb.lit_s[warmup:]
            out["plain_step_s"] = cb.plain_s[warmup:]
            out["seconds"] = sum(out["step_s"])
            out["plain_final_loss"] = cb.plain_loss
        else:
            if len(cb.t) != total:
                raise RuntimeError(f"expected {total} timed steps, got {len(cb.t)}")
            out["step_s"] = [b - a for a, b in zip(cb.t[warmup - 1 : -1], cb.t[warmup:])]
            out["seconds"] = cb.t[-1] - cb.t[warmup - 1]
        return out


def plain_run(setup, precision: str, compiled: bool, fused: bool, warmup: int, steps: int, cls=None) -> dict:
    cfg, dm, mcfg = setup
    pt = (cls or PlainTrainer)(cfg, dm, mcfg, precision, compiled, fused)
    t = []
    loss = None
    for k in range(warmup + steps):
        loss = pt.step(k)
        t.append(time.perf_counter())
    return {
        "seconds": t[-1] - t[warmup - 1],
        "step_s": [b - a for a, b in zip(t[warmup - 1 : -1], t[warmup:])],
        "tokens": steps * pt.tokens_per_step,
        "final_loss": float(loss),
        "fused": pt.fused,
        "groups": pt.groups,
        "threads": __import__("torch").get_num_threads(),
    }


# ---- subprocess runs (peak RSS) -------------------------------------------------------------------


def train_subprocess(args: list[str], timeout: float) -> dict:
    """Run train.py with args: wall time, time to its `model:` line (startup), peak RSS from wait4."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    script = [str(ROOT / "train.py")]
    meter = LoadMeter()
    meter.start()
    t0 = time.perf_counter()
    p = subprocess.Popen([PY, *script, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
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
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)  # rusage of this child alone
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
    with open("/proc/stat") as f:  # others = machine busy time minus the child's CPU time
        v = [int(x) for x in f.readline().split()[1:]]
    busy = (sum(v[:8]) - v[3] - v[4]) / meter.tick - meter._s[1]
    others = max(0.0, busy - ru.ru_utime - ru.ru_stime) / (wall * meter.ncpu)
    return {
        "rc": p.returncode,
        "wall_s": wall,
        "startup_s": marks["model"] - t0 if "model" in marks else math.nan,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_mb": ru.ru_maxrss / 1024,  # Linux: KiB
        "others_cpu": others,
        "tail": "".join(lines[-15:]),
    }


def train_args(data: Path, run_dir: str, *overrides: str) -> list[str]:
    """train.py arguments for experiment=shakespeare_baby on `data`; hydra.run.dir last (commands print args[:-1])."""
    return [
        "experiment=shakespeare_baby",
        f"data.path={data}",
        *overrides,
        "print_sample=false",
        f"hydra.run.dir={run_dir}",
    ]


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
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": _cpu_flags(),
        "loadavg_start": os.getloadavg(),
    }


def _cpu_flags() -> str:
    """The SIMD flags that decide matmul speed (AVX-512, bf16, AMX): they differ between machines of one name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                keep = ("avx", "fma", "amx", "f16")
                return " ".join(f for f in line.split(":", 1)[1].split() if f.startswith(keep))
    except OSError:
        pass
    return "?"


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


def table(title: str, header: list[str], rows: list[list[str]], left: int = 2) -> list[str]:
    """Print a rich table; return the same table as markdown lines."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    for i, h in enumerate(header):
        t.add_column(h, justify="left" if i < left else "right")
    for r in rows:
        t.add_row(*r)
    Console(width=200).print(t)
    md = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" if i < left else "---:" for i in range(len(header))) + "|",
    ]
    md += ["| " + " | ".join(r) + " |" for r in rows]
    return md


def rebuild_markdown() -> Path:
    """bench/results/throughput.md from every bench/results/*.json written by this script."""
    docs = []
    for f in sorted(RESULTS.glob("*.json")):
        try:
            d = json.loads(f.read_text())
        except ValueError:
            continue
        if isinstance(d, dict) and d.get("kind") == "throughput":
            docs.append(d)
    lines = [
        "# Training throughput: microgpt (Lightning) vs a plain PyTorch loop over the same GPT",
        "",
        "Written by `bench/throughput.py` (see bench/README.md); do not edit by hand. Target: Lightning overhead "
        f"<= {OVERHEAD_TARGET:.0%} of the plain loop. The comparison with nanoGPT itself: vs_nanogpt.md.",
        "",
    ]
    for d in sorted(docs, key=lambda d: d["date"]):
        m = d["machine"]
        lines += [f"## {d['title']}", "", f"- command: `{d['command']}`", f"- date: {d['date']}"]
        lines.append(
            f"- machine: nproc {m['nproc']} ({m['cpu']}), torch {m['torch']}, lightning {m['lightning']}, "
            f"python {m['python']}, torch threads {m['torch_threads']}, load average at start "
            f"{', '.join(f'{x:.2f}' for x in m['loadavg_start'])}"
        )
        if "cpu_flags" in m:
            lines.append(f"- CPU SIMD flags: `{m['cpu_flags']}`; torch CPU capability {m['torch_cpu_capability']}")
        lines += ["", *d["table_md"], "", *d.get("notes", []), ""]
    path = RESULTS / "throughput.md"
    path.write_text("\n".join(lines).rstrip() + "\n")
    return path


def write(tag: str, doc: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    f = RESULTS / f"{tag.replace('+', '-').replace('/', '-')}.json"
    f.write_text(json.dumps(doc, indent=2, default=str) + "\n")
    print(f"wrote {f.relative_to(ROOT)} and {rebuild_markdown().relative_to(ROOT)}")


def _med_step_tok(tokens_per_step: float, step_s: list[float]) -> float:
    return tokens_per_step / statistics.median(step_s)


def _f3(v: float) -> str:
    return f"{v:.3f}" if math.isfinite(v) else "-"


def summarize(a, configs, runs) -> tuple[list[str], list[list[str]], dict]:
    header = [
        "config",
        "runner",
        "tok/s",
        "ms/iter",
        "runs (k tok/s)",
        "vs plain",
        "tok/s, median step",
        "vs plain, median step",
        "others' CPU",
        "loss@end",
    ]
    rows, summary = [], {}
    for pc in configs:
        tag = config_tag(*pc)
        series: dict[str, list[dict]] = {}
        for r in a.runners:
            rs = runs[(pc, r)]
            if r == "paired":  # two series out of one run
                series["paired: lightning"] = rs
                series["paired: plain"] = [
                    {
                        **x,
                        "step_s": x["plain_step_s"],
                        "seconds": sum(x["plain_step_s"]),
                        "final_loss": x["plain_final_loss"],
                    }
                    for x in rs
                ]
            else:
                series[r] = rs
        for name, rs in series.items():
            tps = rs[0]["tokens"] / a.steps
            tok = [x["tokens"] / x["seconds"] for x in rs]
            step_tok = [_med_step_tok(tps, x["step_s"]) for x in rs]
            med, med_step = statistics.median(tok), statistics.median(step_tok)
            ref = "paired: plain" if name == "paired: lightning" else "plain" if name != "paired: plain" else None
            vs = vs_step = math.nan
            if ref in series and name != ref:  # per repeat: run / its plain counterpart, then the median
                p_tok = [x["tokens"] / x["seconds"] for x in series[ref]]
                p_step = [_med_step_tok(tps, x["step_s"]) for x in series[ref]]
                vs = statistics.median(u / v for u, v in zip(tok, p_tok))
                vs_step = statistics.median(u / v for u, v in zip(step_tok, p_step))
            others = [x.get("others_cpu", math.nan) for x in rs]
            summary[f"{tag}/{name}"] = {
                "tok_s": tok,
                "median_tok_s": med,
                "ms_per_iter": 1000 * tps / med,
                "median_step_tok_s": step_tok,
                "median_of_median_step_tok_s": med_step,
                "vs_plain": vs,
                "vs_plain_median_step": vs_step,
                "others_cpu": others,
                "final_loss": [x["final_loss"] for x in rs],
                "fused_adamw": rs[0]["fused"],
                "param_groups": rs[0]["groups"],
                "threads": rs[0]["threads"],
            }
            rows.append(
                [
                    tag,
                    name,
                    f"{med:,.0f}",
                    f"{1000 * tps / med:.1f}",
                    " ".join(f"{x / 1000:.1f}" for x in tok),
                    _f3(vs),
                    f"{med_step:,.0f}",
                    _f3(vs_step),
                    f"{100 * statistics.median(others):.0f}%",
                    f"{rs[-1]['final_loss']:.4f}",
                ]
            )
    return header, rows, summary


# ---- main ---------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=200, help="timed optimizer steps per run (default 200)")
    ap.add_argument("--warmup", type=int, default=20, help="untimed steps first (default 20)")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repeats of every runner (default 3)")
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", DEFAULT_DATA)))
    ap.add_argument("--precision", nargs="+", default=["32-true"], choices=["32-true", "bf16-mixed"])
    ap.add_argument("--compile", nargs="?", const="on", default="off", choices=["off", "on", "both"])
    ap.add_argument("--runners", nargs="+", default=RUNNERS, choices=RUNNERS, help="loops to time (default all)")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2: the machine's cores)")
    ap.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="before each run wait up to S seconds for other processes to use < --quiet of the CPUs",
    )
    ap.add_argument("--quiet", type=float, default=0.15, help="threshold for --wait-quiet (fraction of all CPUs)")
    ap.add_argument("--no-rss", action="store_true", help="skip the train.py subprocess that measures peak RSS")
    ap.add_argument("--rss-steps", type=int, default=260, help="steps of that subprocess (260: one val + checkpoint)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds allowed to a train.py subprocess")
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


def measure(a, configs) -> dict[tuple, list[dict]]:
    """Every runner of every configuration, `a.repeats` times, interleaved."""
    meter = LoadMeter()
    total = a.warmup + a.steps
    setups = {pc: plain_setup(a.data, pc[0], pc[1], total) for pc in configs}
    runs: dict[tuple, list[dict]] = {(pc, r): [] for pc in configs for r in a.runners}
    fused: dict[tuple, bool] = {}
    for rep in range(a.repeats):
        for pc in configs:
            for r in a.runners:
                quiet_before = meter.wait_quiet(a.wait_quiet, a.quiet) if a.wait_quiet > 0 else math.nan
                meter.start()
                t0 = time.perf_counter()
                if r == "plain":
                    if pc not in fused:  # ask LitGPT once whether it fuses AdamW here
                        fused[pc] = lightning_run(a.data, pc[0], pc[1], 1, 1, "lightning")["fused"]
                        meter.start()
                    res = plain_run(setups[pc], pc[0], pc[1], fused[pc], a.warmup, a.steps)
                else:
                    res = lightning_run(a.data, pc[0], pc[1], a.warmup, a.steps, r, setups[pc])
                    fused.setdefault(pc, res["fused"])
                res["others_cpu"] = meter.others()
                res["others_cpu_before"] = quiet_before
                runs[(pc, r)].append(res)
                extra = ""
                if r == "paired":
                    plain_tok = res["tokens"] / sum(res["plain_step_s"])
                    extra = f" | plain {plain_tok:,.0f} tok/s loss {res['plain_final_loss']:.4f}"
                print(
                    f"[{rep + 1}/{a.repeats}] {config_tag(*pc):<14} {r:<9} {res['tokens'] / res['seconds']:>8,.0f} tok/s"
                    f" loss {res['final_loss']:.4f}{extra}  others {100 * res['others_cpu']:.0f}%"
                    f"  ({time.perf_counter() - t0:.1f} s)",
                    flush=True,
                )
    return runs


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    import torch

    torch.set_num_threads(a.threads)
    import lightning  # noqa: F401  (before quiet(): importing it resets its loggers' levels)

    quiet()
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    mach = machine()
    compiles = {"off": [False], "on": [True], "both": [False, True]}[a.compile]
    configs = [(p, c) for p in a.precision for c in compiles]
    tag = a.tag or "throughput-" + "_".join(config_tag(p, c) for p, c in configs)
    runs = measure(a, configs)

    rss = None
    if not a.no_rss:
        p, c = configs[0]
        with tempfile.TemporaryDirectory(prefix="bench-rss-") as tmp:
            rss_args = train_args(
                a.data, tmp, f"trainer.precision={p}", f"compile={str(c).lower()}", f"trainer.max_steps={a.rss_steps}"
            )
            rss = train_subprocess(rss_args, a.timeout)
            rss["command"] = " ".join(["train.py", *rss_args[:-1]])
            if rss["rc"] != 0:
                print(rss["tail"], file=sys.stderr)

    header, rows, summary = summarize(a, configs, runs)
    title = (
        f"microgpt training throughput: {a.steps} steps after {a.warmup} warm-up, median of {a.repeats}, "
        f"{a.threads} threads"
    )
    md = table(title, header, rows)
    notes = [
        "- runners: `lightning` = `microgpt.train.run` with `callbacks=none logger=none`; `plain` = hand-written "
        "loop over the same GPT, initial weights, batches, AdamW groups, LR schedule and grad clip; `paired: *` = "
        "one Lightning run with a plain step after each Lightning step, both timed per step; `defaults` = the "
        "experiment's own callbacks (RichProgressBar, LearningRateMonitor, ModelCheckpoint) and CSV logger. "
        "The comparison with nanoGPT itself is bench/vs_nanogpt.py's.",
        "- tok/s = tokens of the timed window / its time, median over repeats; `median step` = tokens per step / the "
        "run's median step time (robust to other jobs). vs plain = "
        "median over repeats of (run / plain run of the same repeat); Lightning overhead = 1 - that. others' CPU = share of the machine's CPUs used by "
        "other processes during the run (median over repeats): above a few % the absolute numbers are not those of "
        "a quiet machine, only the side-by-side ratios are meaningful.",
    ]
    for pc in configs:
        ends = {r: runs[(pc, r)][-1]["final_loss"] for r in a.runners}
        if "paired" in a.runners:
            ends["paired plain"] = runs[(pc, "paired")][-1]["plain_final_loss"]
        notes.append(
            f"- {config_tag(*pc)}: training loss after {a.warmup + a.steps} steps (same init, batches and optimizer, so the loops "
            "should agree): " + ", ".join(f"{r} {v:.4f}" for r, v in ends.items())
        )
    if rss is not None:
        notes.append(
            f"- peak RSS of `{rss['command']}` (a subprocess; wait4 ru_maxrss): {rss['peak_rss_mb']:.0f} MB; it took {rss['wall_s']:.1f} s, {rss['startup_s']:.1f} s of it "
            f"before training (imports, data, model); exit status {rss['rc']}"
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
            "results": summary,
            "raw_step_s": {f"{config_tag(*pc)}/{r}": [x["step_s"] for x in runs[(pc, r)]] for pc, r in runs},
            "rss": {k: v for k, v in rss.items() if k != "tail"} if rss else None,
            "table_md": md,
            "notes": notes,
        }
        write(tag, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
