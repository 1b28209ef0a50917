"""Where one training step of `experiment=shakespeare_baby` spends its time, by operator (torch.profiler).

    .venv/bin/python bench/profile_step.py [--steps 20] [--threads 2] [--out bench/results/profile-step.md]

Runs bench/throughput.py's plain loop (microgpt's GPT, AdamW as LitGPT builds it, grad clip) for a warm-up,
then profiles `--steps` steps and prints the operators by self CPU time, with their share of the step and the
matmul throughput (GFLOP/s of `aten::mm`/`aten::addmm`/`aten::bmm` from the shapes). It answers one question:
how much of a step is arithmetic that any trainer must do, and how much is left for a framework to save.
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

MATMULS = ("aten::mm", "aten::addmm", "aten::bmm")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=15)
    ap.add_argument("--data", type=Path, default=Path(tp.os.environ.get("BENCH_DATA", tp.DEFAULT_DATA)))
    ap.add_argument("--out", type=Path, default=None, help="also write the table as markdown here")
    a = ap.parse_args(argv)
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(a.threads)
    import lightning  # noqa: F401

    tp.quiet()
    setup = tp.plain_setup(a.data.resolve(), "32-true", False, a.warmup + a.steps)
    cfg, dm, mcfg = setup
    loop = tp.PlainTrainer(cfg, dm, mcfg, "32-true", False, fused=True)
    for k in range(a.warmup):
        loop.step(k)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for k in range(a.warmup, a.warmup + a.steps):
            loop.step(k)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)  # us, all steps
    flops = 0.0
    for e in prof.events():
        if e.name in MATMULS and e.input_shapes and len(e.input_shapes) >= 2:
            s = [x for x in e.input_shapes if x]
            if e.name == "aten::addmm" and len(s) >= 3:
                (m, k_), (_, n) = s[1], s[2]
                flops += 2 * m * k_ * n
            elif e.name == "aten::mm":
                (m, k_), (_, n) = s[0], s[1]
                flops += 2 * m * k_ * n
            elif e.name == "aten::bmm":
                (b, m, k_), (_, _, n) = s[0], s[1]
                flops += 2 * b * m * k_ * n
    mm_us = sum(e.self_cpu_time_total for e in events if e.key in MATMULS)
    rows = []
    for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[: a.rows]:
        rows.append(
            [
                e.key[:60],
                f"{e.count // a.steps}",
                f"{e.self_cpu_time_total / a.steps / 1000:.2f}",
                f"{100 * e.self_cpu_time_total / total:.1f}%",
            ]
        )
    per_step_ms = total / a.steps / 1000
    md = tp.table(
        f"plain-loop step of experiment=shakespeare_baby, {a.threads} threads: {per_step_ms:.1f} ms of operator time",
        ["operator", "calls/step", "ms/step", "share"],
        rows,
        left=1,
    )
    notes = [
        f"- command: `.venv/bin/python bench/profile_step.py {' '.join(sys.argv[1:])}`",
        f"- date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}; CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}, flags {tp.machine()['cpu_flags']}",
        f"- matmuls (mm/addmm/bmm): {100 * mm_us / total:.0f}% of operator time, {flops / a.steps / 1e9:.2f} GFLOP per "
        f"step at {flops / (mm_us / 1e6) / 1e9:.0f} GFLOP/s. Operator time is self CPU time of the main thread's ops "
        "(intra-op threads included in the op's wall time).",
    ]
    for n in notes:
        print(n)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text("\n".join(["# Operator profile of one training step", "", *md, "", *notes, ""]))
        print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
