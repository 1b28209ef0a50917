"""microgpt against nanoGPT itself, side by side on this machine: `make bench`.

    .venv/bin/python bench/vs_nanogpt.py [--rounds 2] [--seeds 1337 0 1 3] [--wait-quiet 120]

nanoGPT is the real one: ../shared/tools/nanogpt-baseline.sh runs Karpathy's unmodified train.py with its
README's CPU "baby GPT" settings (2000 iterations on tiny Shakespeare). microgpt runs
`train.py experiment=shakespeare_baby` on the same text, same torch, same thread count. The two alternate
(A B A B ...) for --rounds rounds, each round waiting for the machine to be quiet first (--wait-quiet).

Per run it records: tokens/s of the training steps (median step time, validation excluded), the
whole-process wall time, the time from process start to the first training step, the peak RSS (wait4 of
the process tree) and the val loss at the last step. The table gives medians and microgpt/nanoGPT ratios.
Val loss is compared over --seeds (default 1337 0 1 3) for both: mean and sd of each side, and whether
microgpt's mean lies within one sd of nanoGPT's mean. nanoGPT's train.py fixes its seed at 1337; a config file
passed through nanogpt-baseline.sh (nanoGPT's configurator runs it) redirects that seeding to each seed. Val
loss does not depend on timing: `--seed-jobs 2` runs the seed comparison two at a time, `--rounds 0` runs it
alone, and `--seeds-from FILE` puts an earlier one into the table.

Results: bench/results/vs_nanogpt.json and .md, with the command, CPU model and SIMD flags.
bench/speedrun.py reuses `run_nanogpt` / `run_microgpt` for the time-to-quality comparison.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
# the developers' shared folder next to the checkout (../shared; from a worktree in wt/NAME, ../../shared)
SHARED = Path(
    os.environ.get("MICROGPT_SHARED")
    or next(
        (p / "shared" for p in (ROOT.parent, ROOT.parent.parent) if (p / "shared").is_dir()), ROOT.parent / "shared"
    )
)
BASELINE = SHARED / "tools" / "nanogpt-baseline.sh"
DATA = SHARED / "data" / "tinyshakespeare.txt"
PY = sys.executable
TOKENS_PER_STEP = 12 * 64  # the baby GPT's batch x block

sys.path.insert(0, str(BENCH))
from throughput import LoadMeter, machine  # noqa: E402  (same folder: CPU model, flags, load meter)

TIME = shutil.which("time") or "/usr/bin/time"


def _timed(cmd: list[str], rss_file: Path) -> list[str]:
    """cmd under /usr/bin/time, which writes the peak RSS (KB) of cmd's process tree to rss_file. The harness's
    own wait4 rusage is not used for it: a child forked from this process (which has imported torch) starts with
    this process's pages, and Linux keeps that pre-exec high-water mark in the child's ru_maxrss."""
    return [TIME, "-f", "%M", "-o", str(rss_file), *cmd] if Path(TIME).is_file() else cmd


def _peak_rss_mb(rss_file: Path, ru) -> float:
    try:
        return int(rss_file.read_text().split()[-1]) / 1024
    except (OSError, ValueError, IndexError):
        return ru.ru_maxrss / 1024


def _wait(p: subprocess.Popen, timeout: float):
    """wait4 the child: (returncode, rusage); ru_maxrss covers its waited-for descendants too."""
    deadline = time.time() + timeout
    while True:
        pid, status, ru = os.wait4(p.pid, os.WNOHANG)
        if pid:
            return os.waitstatus_to_exitcode(status), ru
        if time.time() > deadline:
            p.kill()
            _, status, ru = os.wait4(p.pid, 0)
            return 124, ru
        time.sleep(0.05)


# nanoGPT's train.py seeds torch with `1337 + seed_offset` after reading its config, and `seed` is no config
# key, so `--seed=N` is refused. Its configurator runs any extra positional argument as a config file (Python,
# in train.py's globals, before the seeding): this one, written per seed, makes that seeding call use N.
NANOGPT_SEED_CONFIG = """# microgpt bench/vs_nanogpt.py: run nanoGPT with seed {seed} instead of its fixed 1337
import torch as _torch
_seed_manual = _torch.manual_seed
_torch.manual_seed = lambda s, _f=_seed_manual: _f(s - 1337 + {seed})
"""


def nanogpt_seed_args(seed: int | None, folder: Path) -> list[str]:
    """nanogpt-baseline.sh's extra arguments for `seed` (none for its own 1337)."""
    if seed is None or seed == 1337:
        return []
    path = Path(folder).resolve() / f"nanogpt_seed_{seed}.py"
    path.write_text(NANOGPT_SEED_CONFIG.format(seed=int(seed)))
    return [str(path)]


def reference_missing() -> bool:
    """nanoGPT's runner or the corpus is not beside the checkout: say so in one line (the side-by-side benchmarks
    need the developers' ../shared folder)."""
    if BASELINE.is_file() and DATA.is_file():
        return False
    print(f"error: {BASELINE} or {DATA} not found; set MICROGPT_SHARED to the shared/ folder", file=sys.stderr)
    return True


def run_nanogpt(
    threads: int,
    timeout: float = 1800,
    extra: list[str] | None = None,
    seed: int | None = None,
    work: Path | None = None,
) -> dict:
    """One run of nanogpt-baseline.sh; the val curve is timed by watching its log as it grows.
    `work`: its working copy (one per concurrent run; default $NANOGPT_WORK or /tmp/nanogpt-baseline)."""
    work = Path(work or os.environ.get("NANOGPT_WORK", Path(tempfile.gettempdir()) / "nanogpt-baseline"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "run.log"
    if log.exists():
        log.unlink()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads), "NANOGPT_WORK": str(work)}
    extra = [*(extra or []), *nanogpt_seed_args(seed, work.parent)]
    t0 = time.time()
    rss_file = work.parent / f"{work.name}.rss"
    cmd = _timed(["bash", str(BASELINE), PY, *extra], rss_file)
    p = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    seen: dict[str, float] = {}
    curve: list[tuple[float, int, float]] = []
    stop = threading.Event()

    def watch() -> None:  # first-seen time of each log line (nanoGPT prints unbuffered with PYTHONUNBUFFERED)
        pos = 0
        while not stop.is_set():
            if log.exists():
                with log.open() as f:
                    f.seek(pos)
                    chunk = f.read()
                    pos = f.tell()
                now = time.time() - t0
                for line in chunk.splitlines():
                    m = re.match(r"step (\d+): train loss [0-9.]+, val loss ([0-9.]+)", line)
                    if m:
                        curve.append((now, int(m.group(1)), float(m.group(2))))
                    if line.startswith("iter 0:"):
                        seen.setdefault("iter0", now)
            time.sleep(0.05)

    th = threading.Thread(target=watch, daemon=True)
    th.start()
    rc, ru = _wait(p, timeout)
    wall = time.time() - t0
    time.sleep(0.2)
    stop.set()
    th.join()
    out = p.stdout.read().decode()
    m = re.search(r"wall_s=([0-9.]+) val_loss=([0-9.na]+) ms_per_iter=([0-9.na]+)", out)
    if rc != 0 or not m:
        raise RuntimeError(f"nanogpt-baseline.sh failed (rc {rc}): {out[-500:]}")
    ms = float(m.group(3))
    # iter 0's line comes after nanoGPT's step-0 evaluation (40 forward batches) and the first step
    text = log.read_text() if log.exists() else ""
    it0 = re.search(r"iter 0: loss [0-9.]+, time ([0-9.]+)ms", text)
    first_step = seen.get("iter0", math.nan) - (float(it0.group(1)) / 1000 if it0 else 0.0)
    return {
        "impl": "nanoGPT",
        "seed": 1337 if seed is None else seed,
        "wall_s": wall,
        "first_step_s": first_step,
        "tok_s": TOKENS_PER_STEP / (ms / 1000),
        "ms_per_step": ms,
        "peak_rss_mb": _peak_rss_mb(rss_file, ru),
        "val_loss": float(m.group(2)),
        "curve": curve,
    }


def run_microgpt(overrides: list[str], threads: int, timeout: float = 1800) -> dict:
    """One `train.py` run with the bench clock callback; returns the same fields as run_nanogpt."""
    with tempfile.TemporaryDirectory(prefix="bench-mgpt-") as tmp:
        clock = Path(tmp) / "clock.jsonl"
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": str(threads),
            "MICROGPT_BENCH_CLOCK": str(clock),
            "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]),
        }
        args = [
            *overrides,
            f"data.path={DATA}",
            "print_sample=false",
            "+callbacks.bench_clock._target_=bench_clock.Clock",
            f"hydra.run.dir={tmp}/run",
        ]
        t0 = time.time()
        rss_file = Path(tmp) / "rss"
        p = subprocess.Popen(
            _timed([PY, str(ROOT / "train.py"), *args], rss_file),
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        drain = threading.Thread(target=p.stdout.read, daemon=True)  # keep the pipe from filling
        drain.start()
        rc, ru = _wait(p, timeout)
        wall = time.time() - t0
        if rc != 0 or not clock.exists():
            raise RuntimeError(f"train.py {' '.join(args)} failed (rc {rc})")
        events = [json.loads(line) for line in clock.read_text().splitlines()]
        peak_rss_mb = _peak_rss_mb(rss_file, ru)
    steps = [e for e in events if e["event"] == "step"]
    vals = [e for e in events if e["event"] == "val"]
    after_val = {v["step"] + 1 for v in vals}  # the step that follows a validation includes it: drop it
    dts = [b["t"] - a["t"] for a, b in zip(steps, steps[1:]) if b["step"] not in after_val]
    ms = statistics.median(dts) * 1000
    first = next(e["t"] for e in events if e["event"] == "first_step")
    return {
        "impl": "microgpt",
        "wall_s": wall,
        "first_step_s": first - t0,
        "tok_s": TOKENS_PER_STEP / (ms / 1000),
        "ms_per_step": ms,
        "peak_rss_mb": peak_rss_mb,
        "val_loss": vals[-1]["val_loss"] if vals else math.nan,
        "curve": [(v["t"] - t0, v["step"], v["val_loss"]) for v in vals],
        "command": "python train.py " + " ".join(a for a in args if not a.startswith(("hydra.run", "+callbacks"))),
    }


LOADS: list[float] = []  # the 1-minute load average just before each run (uptime's first figure)


def wait_quiet(max_wait: float, threshold: float = 0.15) -> float:
    """Wait up to max_wait s for other processes to use < threshold of the CPUs; returns their share."""
    share = math.nan if max_wait <= 0 else LoadMeter().wait_quiet(max_wait, threshold)
    LOADS.append(os.getloadavg()[0])
    return share


def machine_lines(mach: dict, others: list[float]) -> list[str]:
    """The CPU a result was measured on, and how busy other processes kept it (for the .md files)."""
    busy = ", ".join(f"{o:.0%}" for o in others if not math.isnan(o))
    return [
        f"CPU: {mach['cpu']} ({mach['nproc']} cores; flags: {mach['cpu_flags']}; torch CPU capability "
        f"{mach['torch_cpu_capability']}); torch {mach['torch']}, Lightning {mach['lightning']}.",
        f"Other processes' CPU share before each run: {busy or 'not measured'}; 1-minute load average before each "
        f"run: {', '.join(f'{x:.2f}' for x in LOADS) or 'not recorded'} ({mach['nproc']} cores).",
    ]


def _med(runs: list[dict], key: str) -> float:
    vals = [r[key] for r in runs if not math.isnan(r[key])]
    return statistics.median(vals) if vals else math.nan


def seed_stats(seeds: dict[str, dict[int, float]]) -> dict:
    """Mean and sd of each side's val loss over the seeds, and whether microgpt's mean is within one sd of
    nanoGPT's mean (the sd of nanoGPT's runs: its seed-to-seed spread is the yardstick)."""
    out: dict = {}
    for impl in ("nanoGPT", "microgpt"):
        v = list(seeds.get(impl, {}).values())
        out[impl] = {
            "n": len(v),
            "mean": statistics.mean(v) if v else math.nan,
            "sd": statistics.stdev(v) if len(v) > 1 else math.nan,
        }
    n, m = out["nanoGPT"], out["microgpt"]
    out["diff"] = m["mean"] - n["mean"]
    out["met"] = None if math.isnan(n["sd"]) or math.isnan(m["mean"]) else abs(out["diff"]) <= n["sd"]
    return out


def summarize(nano: list[dict], micro: list[dict], seeds: dict[str, dict[int, float]]) -> tuple[list[str], dict]:
    rows = [
        ("training-step tokens/s", "tok_s", "higher", 1.15, ">="),
        ("whole-process wall (s)", "wall_s", "lower", 0.9, "<="),
        ("start-up to first step (s)", "first_step_s", "lower", None, None),
        ("peak RSS (MB)", "peak_rss_mb", "lower", 1.15, "<="),
        ("val loss at step 2000", "val_loss", "lower", None, None),
    ]
    lines = [
        "| figure | nanoGPT (median) | microgpt (median) | microgpt / nanoGPT | target | met |",
        "|---|---|---|---|---|---|",
    ]
    summary: dict = {}
    for label, key, _, target, op in rows if nano and micro else []:
        a, b = _med(nano, key), _med(micro, key)
        ratio = b / a if a else math.nan
        met = ""
        if target is not None:
            met = "yes" if (ratio >= target if op == ">=" else ratio <= target) else "no"
        target_txt = f"{op} {target}" if target is not None else ""
        if key == "first_step_s":  # an absolute target: microgpt's own start-up
            target_txt, met = "microgpt <= 2.5 s", ("yes" if b <= 2.5 else "no")
        lines.append(f"| {label} | {a:.4g} | {b:.4g} | {ratio:.3f} | {target_txt} | {met} |")
        summary[key] = {"nanogpt": a, "microgpt": b, "ratio": ratio, "met": met}
    if seeds:
        st = seed_stats(seeds)
        n, m = st["nanoGPT"], st["microgpt"]
        met = "n/a (needs >= 2 nanoGPT seeds)" if st["met"] is None else ("yes" if st["met"] else "no")
        lines.append(
            f"| val loss, mean ± sd over seeds {', '.join(str(k) for k in seeds.get('microgpt', {}))} | "
            f"{n['mean']:.4f} ± {n['sd']:.4f} | {m['mean']:.4f} ± {m['sd']:.4f} | {st['diff']:+.4f} | "
            f"within nanoGPT's 1 sd | {met} |"
        )
        summary["val_seeds"] = {**st, "runs": seeds}
    return lines, summary


def run_seeds(
    seeds: list[int], overrides: list[str], threads: int, jobs: int, impls: tuple[str, ...] = ("nanoGPT", "microgpt")
) -> dict[str, dict[int, float]]:
    """Each side's (`impls`) final val loss for every seed. Val loss does not depend on timing, so with jobs > 1
    the runs go `jobs` at a time (threads // jobs torch threads each)."""
    from concurrent.futures import ThreadPoolExecutor

    per = max(1, threads // max(1, jobs))
    tmp = Path(tempfile.mkdtemp(prefix="bench-seeds-"))

    def one(task: tuple[str, int]) -> tuple[str, int, float]:
        impl, s = task
        if impl == "nanoGPT":
            r = run_nanogpt(per, seed=s, work=tmp / f"nanogpt-{s}")
        else:
            r = run_microgpt([*overrides, f"seed={s}"], per)
        print(f"seed {s}: {impl} val {r['val_loss']:.4f}", flush=True)
        return impl, s, r["val_loss"]

    out: dict[str, dict[int, float]] = {"nanoGPT": {}, "microgpt": {}}
    tasks = [(impl, s) for s in seeds for impl in impls]
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        for impl, s, v in pool.map(one, tasks):
            out[impl][s] = v
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="A B rounds (default 2; 0: the seed comparison only)")
    ap.add_argument("--seeds", type=int, nargs="*", default=[1337, 0, 1, 3], help="seeds of the val comparison")
    ap.add_argument("--seed-jobs", type=int, default=1, help="seed runs at a time (val loss needs no quiet machine)")
    ap.add_argument(
        "--seeds-from", type=Path, default=None, help="take the seed comparison from an earlier result json"
    )
    ap.add_argument(
        "--rerun-seeds",
        choices=["microgpt", "nanoGPT"],
        default=None,
        help="with --seeds-from: run this side's seeds again (after a change to it), keep the other side's",
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--wait-quiet", type=float, default=120, help="seconds to wait for a quiet machine per run")
    ap.add_argument("--overrides", nargs="*", default=["experiment=shakespeare_baby"], help="microgpt's train.py args")
    ap.add_argument("--out", default="vs_nanogpt", help="results/<out>.{json,md} (default vs_nanogpt)")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if reference_missing():
        return 2
    start = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    mach = machine()
    nano, micro, others = [], [], []
    for r in range(a.rounds):
        for impl in ("nanoGPT", "microgpt"):
            others.append(wait_quiet(a.wait_quiet))
            run = run_nanogpt(a.threads) if impl == "nanoGPT" else run_microgpt(a.overrides, a.threads)
            (nano if impl == "nanoGPT" else micro).append(run)
            print(
                f"round {r + 1} {impl:8s} wall {run['wall_s']:.1f}s first step {run['first_step_s']:.2f}s "
                f"{run['tok_s']:.0f} tok/s rss {run['peak_rss_mb']:.0f} MB val {run['val_loss']:.4f}",
                flush=True,
            )
    seeds_doc = None
    if a.seeds_from:
        seeds_doc = json.loads(a.seeds_from.read_text())
        seeds = {k: {int(s): v for s, v in d.items()} for k, d in seeds_doc["summary"]["val_seeds"]["runs"].items()}
        if a.rerun_seeds:
            again = sorted(seeds[a.rerun_seeds])
            seeds[a.rerun_seeds] = run_seeds(again, a.overrides, a.threads, a.seed_jobs, impls=(a.rerun_seeds,))[
                a.rerun_seeds
            ]
    elif a.seeds:
        seeds = run_seeds(a.seeds, a.overrides, a.threads, a.seed_jobs)
    else:
        seeds = {}
    lines, summary = summarize(nano, micro, seeds)
    print("\n".join(lines))
    if a.no_write:
        return 0
    doc = {
        "date": start,
        "command": " ".join([".venv/bin/python", "bench/vs_nanogpt.py", *(argv or sys.argv[1:])]),
        "machine": mach,
        "others_cpu_before_runs": others,
        "nanogpt": nano,
        "microgpt": micro,
        "summary": summary,
    }
    if seeds_doc is not None:
        doc["seeds_from"] = {"path": str(a.seeds_from), "date": seeds_doc["date"], "command": seeds_doc["command"]}
        doc["seeds_rerun"] = a.rerun_seeds
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{a.out}.json").write_text(json.dumps(doc, indent=1))
    md = [
        "# microgpt vs nanoGPT, side by side on one machine",
        "",
        f"`{doc['command']}` — {start}",
        "",
        *machine_lines(mach, others),
        "",
        *lines,
        "",
    ]
    if seeds_doc is not None and a.rerun_seeds:
        kept = "microgpt" if a.rerun_seeds == "nanoGPT" else "nanoGPT"
        md += [
            f"The val-loss row over seeds: {a.rerun_seeds}'s seeds were run again by this command "
            f"({a.seed_jobs} at a time, {max(1, a.threads // max(1, a.seed_jobs))} thread(s) each; val loss does not "
            f"depend on timing); {kept}'s come from `{seeds_doc['command']}` ({seeds_doc['date']}).",
            "",
        ]
    elif seeds_doc is not None:
        md += [
            f"The val-loss row over seeds comes from `{seeds_doc['command']}` ({seeds_doc['date']}): val loss does "
            "not depend on machine load, so those runs went two at a time while the machine was shared.",
            "",
        ]
    elif seeds:
        md += [
            "Seeds: microgpt's `seed=N`; nanoGPT's fixed `torch.manual_seed(1337)` redirected to N by a config file "
            "given to nanogpt-baseline.sh (its configurator runs such files; see NANOGPT_SEED_CONFIG in "
            "vs_nanogpt.py). nanoGPT itself is unmodified.",
            "",
        ]
    (RESULTS / f"{a.out}.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
