"""Start-up to the first training step: microgpt, nanoGPT itself, and the floor under both, on this machine.

    .venv/bin/python bench/startup.py [--rounds 5] [--threads N] [--wait-quiet 30]

Each round runs, one after another and each after waiting for a quiet machine:
  floor     `python -c "import torch; torch.optim.AdamW(...)"`: what any PyTorch training script pays before
            its first step. Building a torch.optim optimizer imports torch._dynamo (its methods are wrapped in
            torch._disable_dynamo, which imports it on first call), so nanoGPT pays that import as well.
  nanoGPT   ../shared/tools/nanogpt-baseline.sh with `--max_iters=1 --eval_iters=1`, timed as bench/vs_nanogpt.py
            times it (the `iter 0` line's arrival minus that iteration's own time, which includes its step-0
            evaluation).
  microgpt  `train.py experiment=shakespeare_baby trainer.max_steps=2` with bench/vs_nanogpt.py's clock callback.
  phases    the same train.py run under bench/startup_trace.py: a timestamp after each import and around Hydra's
            config composition and microgpt's run/fit, so the table says where microgpt's start-up goes.
The table gives medians over the rounds. Results: bench/results/startup.{json,md} with the CPU model and flags.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))
from vs_nanogpt import (  # noqa: E402  (same folder)
    DATA,
    PY,
    RESULTS,
    machine,
    machine_lines,
    reference_missing,
    run_microgpt,
    run_nanogpt,
    wait_quiet,
)

TARGET_S = 2.5  # issue 9: microgpt's start-up to its first training step
BABY = ["experiment=shakespeare_baby", "trainer.max_steps=2"]
FLOOR = "import time, torch; torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]); print(time.time())"

# (label, from event, to event): consecutive spans of the traced run; "start" is the harness's spawn time
PHASES = [
    ("python start-up", "start", "python"),
    ("import hydra, omegaconf", "python", "hydra_imported"),
    ("import torch", "hydra_imported", "torch_imported"),
    ("import torch._dynamo (Lightning's and torch.optim's)", "torch_imported", "dynamo_imported"),
    ("import Lightning (its own modules, torchmetrics)", "dynamo_imported", "lightning_imported"),
    ("train.py, Hydra: command line, search path", "lightning_imported", "compose>"),
    ("Hydra: compose the config (1st: the run mode)", "compose>", "compose>#2"),
    ("Hydra: compose the config (2nd: the run)", "compose>#2", "compose<#2"),
    ("Hydra: run dir, logging, config files", "compose<#2", "run>"),
    ("microgpt: checks, data, model, Trainer", "run>", "resume_gc>"),
    ("microgpt: GC freeze, defaults back (resume_gc)", "resume_gc>", "resume_gc<"),
    ("Lightning: fit set-up (optimizer, loops) to step 1", "resume_gc<", "first_step"),
]


def run_floor(threads: int) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    t0 = time.time()
    out = subprocess.run([PY, "-c", FLOOR], env=env, capture_output=True, text=True, check=True, timeout=300)
    return float(out.stdout.strip().splitlines()[-1]) - t0


def run_phases(threads: int, overrides: list[str]) -> dict[str, float]:
    """One traced train.py run: {event: seconds since spawn}; a repeated event gets '#2', '#3', ..."""
    with tempfile.TemporaryDirectory(prefix="bench-startup-") as tmp:
        out = Path(tmp) / "trace.jsonl"
        args = [
            *overrides,
            "+callbacks.first_step._target_=startup_trace.FirstStep",
            f"hydra.run.dir={tmp}/run",
        ]
        env = {
            **os.environ,
            "OMP_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(BENCH), os.environ.get("PYTHONPATH", "")]),
        }
        t0 = time.time()
        p = subprocess.run(
            [PY, str(BENCH / "startup_trace.py"), str(out), *args], cwd=ROOT, env=env, capture_output=True, text=True
        )
        if p.returncode != 0 or not out.exists():
            raise RuntimeError(f"startup_trace.py failed (rc {p.returncode}): {p.stderr[-800:]}")
        seen: dict[str, int] = {}
        events = {"start": 0.0}
        for line in out.read_text().splitlines():
            e = json.loads(line)
            n = seen[e["event"]] = seen.get(e["event"], 0) + 1
            events[e["event"] if n == 1 else f"{e['event']}#{n}"] = e["t"] - t0
    return events


def spans(events: dict[str, float]) -> dict[str, float]:
    return {label: events[b] - events[a] for label, a, b in PHASES if a in events and b in events}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--wait-quiet", type=float, default=30, help="seconds to wait for a quiet machine per run")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if reference_missing():
        return 2
    start = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    mach = machine()
    runs: dict[str, list] = {"floor": [], "nanoGPT": [], "microgpt": [], "phases": []}
    others = []
    for r in range(a.rounds):
        others.append(wait_quiet(a.wait_quiet))
        runs["floor"].append(run_floor(a.threads))
        others.append(wait_quiet(a.wait_quiet))
        nano = run_nanogpt(a.threads, extra=["--max_iters=1", "--eval_iters=1", "--log_interval=1"])
        runs["nanoGPT"].append(nano["first_step_s"])
        others.append(wait_quiet(a.wait_quiet))
        runs["microgpt"].append(run_microgpt(BABY, a.threads)["first_step_s"])
        others.append(wait_quiet(a.wait_quiet))
        runs["phases"].append(run_phases(a.threads, [*BABY, f"data.path={DATA}", "print_sample=false"]))
        print(
            f"round {r + 1}: floor {runs['floor'][-1]:.2f} s, nanoGPT {runs['nanoGPT'][-1]:.2f} s, "
            f"microgpt {runs['microgpt'][-1]:.2f} s, traced {runs['phases'][-1].get('first_step', math.nan):.2f} s",
            flush=True,
        )
    med = {k: statistics.median(v) for k, v in runs.items() if k != "phases"}
    traced = [spans(e) for e in runs["phases"]]
    phase_med = {label: statistics.median(t[label] for t in traced if label in t) for label, _, _ in PHASES}
    total_traced = statistics.median(e["first_step"] for e in runs["phases"])
    lines = [
        "| process | start-up to the first training step (s), median | all rounds |",
        "|---|---|---|",
        *(
            f"| {name} | {med[key]:.2f} | {', '.join(f'{x:.2f}' for x in runs[key])} |"
            for name, key in (
                ("floor: `import torch` + building a torch.optim.AdamW", "floor"),
                ("nanoGPT (its train.py, unmodified)", "nanoGPT"),
                ("microgpt `train.py experiment=shakespeare_baby`", "microgpt"),
            )
        ),
        "",
        f"microgpt / nanoGPT: {med['microgpt'] / med['nanoGPT']:.2f}x; microgpt - floor: "
        f"{med['microgpt'] - med['floor']:.2f} s; target: microgpt <= {TARGET_S} s: "
        f"{'met' if med['microgpt'] <= TARGET_S else 'not met'}.",
        "",
        f"Where microgpt's start-up goes (the traced run, median of {a.rounds}; total {total_traced:.2f} s):",
        "",
        "| phase | s | share |",
        "|---|---|---|",
        *(f"| {label} | {v:.3f} | {v / total_traced:.0%} |" for label, v in phase_med.items()),
    ]
    print("\n".join(lines))
    if a.no_write:
        return 0
    command = " ".join([".venv/bin/python", "bench/startup.py", *(argv if argv is not None else sys.argv[1:])])
    doc = {"date": start, "command": command, "machine": mach, "others_cpu_before_runs": others, "runs": runs}
    doc["summary"] = {"median": med, "phases_median": phase_med, "traced_total": total_traced}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "startup.json").write_text(json.dumps(doc, indent=1))
    md = ["# Start-up to the first training step", "", f"`{command}` — {start}", "", *machine_lines(mach, others)]
    (RESULTS / "startup.md").write_text("\n".join([*md, "", *lines, ""]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
