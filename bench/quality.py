"""Validation loss of `experiment=shakespeare_baby` after 2000 steps: microgpt against a nanoGPT-style loop, per seed.

    .venv/bin/python bench/quality.py [--seeds 1337 0 1 3] [--data PATH] [--steps 2000]

nanoGPT's reference (val 1.8857 at iter 2000, ../shared/BENCHMARKS.md) is one run: one seed, and a loss
estimated on 20 random val batches (15,360 tokens). Both vary from seed to seed, so one number cannot tell
whether two trainers differ. For each seed this runs, on the same machine:

  microgpt   `train.py experiment=shakespeare_baby seed=S` in a subprocess (wall time and peak RSS recorded)
  nanogpt    bench/throughput.py's `nanogpt-like` loop (nanoGPT's step: exact GELU, foreach AdamW with decay on
             every matrix, its get_batch, warmup + cosine, clip 1.0) for the same number of steps, seed S

and evaluates both final models in one way: on microgpt's 20 val batches for seed S (the figure train.py
logs, and nanoGPT's kind of estimate), and on the whole val split in consecutive 64-token windows (every val
token once: no sampling noise). Means and standard deviations over seeds are compared.

Results: bench/results/quality.json and bench/results/quality.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as tp  # noqa: E402

os = tp.os


def evaluate(model, dm, val) -> tuple[float, float]:
    """(mean loss over the datamodule's val batches, loss over every val token in block-size windows)."""
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        batches = list(dm.val_dataloader())
        sampled = sum(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item() for x, y in batches) / len(batches)
        t = dm.block_size
        n = (len(val) - 1) // t
        xs, ys = val[: n * t].view(n, t), val[1 : n * t + 1].view(n, t)
        total = 0.0
        for i in range(0, n, 256):
            logits = model(xs[i : i + 256])
            total += F.cross_entropy(logits.flatten(0, 1), ys[i : i + 256].flatten(), reduction="sum").item()
    return sampled, total / (n * t)


def one_seed(a, seed: int) -> dict:
    import torch

    import microgpt

    cfg, dm, mcfg = tp.plain_setup(a.data, "32-true", False, a.steps, [f"seed={seed}"])
    val = torch.from_numpy(dm.val_tokens.astype("int64"))
    out: dict = {"seed": seed}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        r = tp.train_subprocess(tp.train_args(a.data, tmp, f"seed={seed}", f"trainer.max_steps={a.steps}"), a.timeout)
        if r["rc"] != 0:
            print(r["tail"], file=sys.stderr)
            raise SystemExit(f"train.py failed for seed {seed} (exit {r['rc']})")
        model, _ = microgpt.load(Path(tmp) / "checkpoints" / "last.ckpt")
        out["microgpt"] = dict(zip(("val_20", "val_full"), evaluate(model, dm, val)))
        out["microgpt"].update(wall_s=r["wall_s"], peak_rss_mb=r["peak_rss_mb"], others_cpu=r["others_cpu"])
    loop = tp.NanoGPTLike(cfg, dm, mcfg, "32-true", False, False)
    torch.manual_seed(seed)
    for k in range(a.steps):
        loop.step(k)
    out["nanogpt"] = dict(zip(("val_20", "val_full"), evaluate(loop.model, dm, val)))
    print(json.dumps(out), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1337, 0, 1, 3])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--data", type=Path, default=Path(os.environ.get("BENCH_DATA", tp.DEFAULT_DATA)))
    ap.add_argument("--timeout", type=float, default=1800)
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    if len(a.seeds) < 2:
        ap.error("give at least two --seeds: the point is the spread")
    if not a.data.is_file():
        ap.error(f"data file {a.data} not found; pass --data PATH or set BENCH_DATA")
    a.data = a.data.resolve()
    import torch

    torch.set_num_threads(a.threads)
    import lightning  # noqa: F401  (before quiet(): importing it resets its loggers' levels)

    tp.quiet()
    date = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    runs = [one_seed(a, s) for s in a.seeds]

    def stats(who: str, key: str) -> tuple[float, float]:
        v = [r[who][key] for r in runs]
        return statistics.mean(v), statistics.stdev(v)

    header = [
        "seed",
        "microgpt val (20 batches)",
        "nanoGPT-style",
        "microgpt val (all)",
        "nanoGPT-style (all)",
        "wall s",
    ]
    rows = [
        [
            str(r["seed"]),
            f"{r['microgpt']['val_20']:.4f}",
            f"{r['nanogpt']['val_20']:.4f}",
            f"{r['microgpt']['val_full']:.4f}",
            f"{r['nanogpt']['val_full']:.4f}",
            f"{r['microgpt']['wall_s']:.1f}",
            f"{100 * r['microgpt']['others_cpu']:.0f}%",
        ]
        for r in runs
    ]
    summary = {f"{w}_{k}": stats(w, k) for w in ("microgpt", "nanogpt") for k in ("val_20", "val_full")}
    rows.append(
        ["mean ± sd"]
        + [f"{m:.4f} ± {s:.4f}" for m, s in (summary[k] for k in ("microgpt_val_20", "nanogpt_val_20"))]
        + [f"{m:.4f} ± {s:.4f}" for m, s in (summary[k] for k in ("microgpt_val_full", "nanogpt_val_full"))]
        + [f"{statistics.median(r['microgpt']['wall_s'] for r in runs):.1f} (median)", ""]
    )
    md = tp.table(f"val loss after {a.steps} steps, experiment=shakespeare_baby, per seed", header, rows, left=1)
    diff = summary["microgpt_val_full"][0] - summary["nanogpt_val_full"][0]
    notes = [
        f"- command: `.venv/bin/python bench/quality.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        f"- date: {date}; machine: {tp.machine()['cpu']}, torch threads {a.threads}",
        f"- nanoGPT's published figure: {tp.NANOGPT['val_loss']} (one seed, 20 random val batches). microgpt - "
        f"nanoGPT-style loop, mean over {len(runs)} seeds, whole val split: {diff:+.4f} "
        f"(sd of one run: {summary['microgpt_val_full'][1]:.4f} / {summary['nanogpt_val_full'][1]:.4f}).",
        "- `20 batches` = microgpt's fixed val batches for that seed (what train.py logs as val_loss); `all` = every "
        "val token once, in consecutive block-size windows. Same data split, model, schedule and steps in both "
        "loops; they differ in initial-weight and batch draws (different RNG streams), so only the spread over "
        "seeds says whether they differ. wall s = the whole train.py process (imports, tokenizing, 8 evals, checkpoints); "
        "others' CPU = share of the machine used by other processes meanwhile (above a few %, wall s is inflated).",
    ]
    for n in notes:
        print(n)
    if not a.no_write:
        doc = {"command": notes[0], "date": date, "machine": tp.machine(), "runs": runs, "summary": summary}
        tp.RESULTS.mkdir(parents=True, exist_ok=True)
        (tp.RESULTS / "quality.json").write_text(json.dumps(doc, indent=2) + "\n")
        text = ["# Validation loss per seed: microgpt vs a nanoGPT-style loop", "", *md, "", *notes, ""]
        (tp.RESULTS / "quality.md").write_text("\n".join(text))
        print("wrote bench/results/quality.json and bench/results/quality.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
