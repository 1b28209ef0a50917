"""Time to quality: `experiment=shakespeare_speedrun` against nanoGPT's baby GPT, side by side.

    .venv/bin/python bench/speedrun.py [--seeds 0 1 2] [--wait-quiet 120]

Per seed, nanoGPT (../shared/tools/nanogpt-baseline.sh, unmodified; the seed reaches it as in vs_nanogpt.py)
and microgpt's speedrun recipe run one after the other on the same machine, same text, same threads. Both val-loss curves are timed from
process start (nanoGPT's by watching its log, microgpt's by bench/bench_clock.py). Reported, as medians
over seeds:
  - t_match: the wall time at which microgpt's val loss first reaches nanoGPT's final val loss of the same
    round (linear interpolation between evaluations), over nanoGPT's whole wall time (target <= 0.5);
  - the gain: nanoGPT's final val loss minus microgpt's val loss at nanoGPT's wall time (target >= 0.08 nats;
    the recipe's run is sized to end near that time; its last evaluation before it is used).
Writes bench/results/speedrun.{json,md,png} (both curves of every round on one plot).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_nanogpt import (  # noqa: E402
    RESULTS,
    machine,
    machine_lines,
    reference_missing,
    run_microgpt,
    run_nanogpt,
    wait_quiet,
)

RECIPE = ["experiment=shakespeare_speedrun"]


def time_to_reach(curve: list[tuple[float, int, float]], target: float) -> float:
    """First wall time at which the val curve reaches `target`, interpolated between evaluations."""
    prev = None
    for t, _, v in curve:
        if v <= target:
            if prev is None:
                return t
            t0, v0 = prev
            return t0 + (t - t0) * (v0 - target) / (v0 - v)
        prev = (t, v)
    return math.nan


def val_at(curve: list[tuple[float, int, float]], t_end: float) -> float:
    """The last val loss measured at or before t_end (what a user stopping then would have)."""
    vals = [v for t, _, v in curve if t <= t_end]
    return vals[-1] if vals else math.nan


def plot(rounds: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, r in enumerate(rounds):
        for impl, color in (("nanoGPT", "tab:gray"), ("microgpt", "tab:blue")):
            c = r[impl]["curve"]
            label = ("nanoGPT baby GPT" if impl == "nanoGPT" else "microgpt shakespeare_speedrun") if i == 0 else None
            ax.plot([p[0] for p in c], [p[2] for p in c], "-o", ms=3, color=color, alpha=0.8, label=label)
    target = statistics.median(r["nanoGPT"]["val_loss"] for r in rounds)
    ax.axhline(target, color="tab:gray", ls=":", lw=1)
    ax.set_xlabel("wall time from process start (s)")
    ax.set_ylabel("val loss (tiny Shakespeare, char)")
    ax.set_ylim(top=min(3.0, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--wait-quiet", type=float, default=120)
    ap.add_argument("--overrides", nargs="*", default=[], help="extra train.py overrides for the recipe")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if reference_missing():
        return 2
    start = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    rounds = []
    for s in a.seeds:
        others = [wait_quiet(a.wait_quiet)]
        nano = run_nanogpt(a.threads, seed=s)  # the same seed on both sides (nanoGPT's through its configurator)
        others.append(wait_quiet(a.wait_quiet))
        micro = run_microgpt([*RECIPE, *a.overrides, f"seed={s}"], a.threads)
        t_match = time_to_reach(micro["curve"], nano["val_loss"])
        gain = nano["val_loss"] - val_at(micro["curve"], nano["wall_s"])
        rounds.append(
            {
                "seed": s,
                "others_cpu": others,
                "nanoGPT": nano,
                "microgpt": micro,
                "t_match_ratio": t_match / nano["wall_s"],
                "gain_at_nanogpt_wall": gain,
            }
        )
        print(
            f"seed {s}: nanoGPT {nano['wall_s']:.1f}s -> {nano['val_loss']:.4f}; microgpt reaches it at "
            f"{t_match:.1f}s ({t_match / nano['wall_s']:.2f}x), {micro['wall_s']:.1f}s -> {micro['val_loss']:.4f}; "
            f"gain at nanoGPT's wall {gain:+.4f}",
            flush=True,
        )
    ratio = statistics.median(r["t_match_ratio"] for r in rounds)
    gain = statistics.median(r["gain_at_nanogpt_wall"] for r in rounds)
    lines = [
        "| figure | median over seeds | target | met |",
        "|---|---|---|---|",
        f"| time to nanoGPT's final val loss / nanoGPT's wall time | {ratio:.3f} | <= 0.5 | {'yes' if ratio <= 0.5 else 'no'} |",
        f"| nanoGPT's val loss - microgpt's at nanoGPT's wall time | {gain:+.4f} | >= 0.08 | {'yes' if gain >= 0.08 else 'no'} |",
        f"| nanoGPT wall (s) / final val | {statistics.median(r['nanoGPT']['wall_s'] for r in rounds):.1f} / "
        f"{statistics.median(r['nanoGPT']['val_loss'] for r in rounds):.4f} | | |",
        f"| microgpt wall (s) / final val | {statistics.median(r['microgpt']['wall_s'] for r in rounds):.1f} / "
        f"{statistics.median(r['microgpt']['val_loss'] for r in rounds):.4f} | | |",
    ]
    print("\n".join(lines))
    if a.no_write:
        return 0
    mach = machine()
    cmd = " ".join([".venv/bin/python", "bench/speedrun.py", *(argv or sys.argv[1:])])
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "speedrun.json").write_text(
        json.dumps({"date": start, "command": cmd, "machine": mach, "rounds": rounds}, indent=1)
    )
    plot(rounds, RESULTS / "speedrun.png")
    md = [
        "# Time to quality: experiment=shakespeare_speedrun vs nanoGPT's baby GPT",
        "",
        f"`{cmd}` — {start}; recipe: `python train.py {' '.join(rounds[0]['microgpt']['command'].split()[2:])}`",
        "",
        *machine_lines(mach, [o for r in rounds for o in r["others_cpu"]]),
        "",
        *lines,
        "",
        "![loss vs wall time](speedrun.png)",
        "",
    ]
    (RESULTS / "speedrun.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
