"""The GPU measurements of issue 9, in one call of at most ~8 minutes on one H100-class GPU: `bench/gpu.sh`.

    bench/gpu.sh                 # on the GPU machine; writes bench/results/gpu.{json,md}
    bench/gpu.sh --dry-run       # every step for 2 steps on the CPU with a tiny model (CI runs this)

Steps (each a `train.py` subprocess with bench/bench_clock.py, each under its own time limit, so a failing
step is recorded and the next one still runs):
  1. mini, small   tokens/s and MFU in bf16-mixed with compile=true; flash SDPA checked by a probe (the model
                   calls F.scaled_dot_product_attention, which takes the flash kernel for bf16 causal attention)
  2. ddp, deepspeed  strategy=ddp vs strategy=deepspeed (ZeRO-2) on 1 GPU, mini, bf16-mixed: tokens/s ratio
  3. speedrun      experiment=shakespeare_speedrun_mini (the speedrun recipe at nanoGPT's mini size): the wall
                   time from process start at which val loss first reaches 1.47 (goal: <= 60 s)
MFU = tokens/s x (6 N + 12 L T d) / peak bf16 FLOP/s (nanoGPT's estimate: N parameters without the position
table, L layers, T context, d width); the peak comes from the GPU's name (table below) or --peak-tflops.
Data: --data, else shared/data/tinyshakespeare.txt (in or next to the checkout), else the test fixture (a
third of tiny Shakespeare: then the 1.47 goal does not apply, and the result says so).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
RESULTS = BENCH / "results"
PY = sys.executable
FIXTURE = ROOT / "tests" / "fixtures" / "shakespeare.txt"
TARGET_VAL, TARGET_S = 1.47, 60.0

# dense bf16 tensor-core peaks (TFLOP/s, without sparsity), from the vendors' data sheets
PEAK_TFLOPS = {
    "H200": 989.4,
    "H100 SXM": 989.4,
    "H100 80GB HBM3": 989.4,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 756.0,
    "GH200": 989.4,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
}

# the dry run: every step for 2 optimizer steps of a tiny model on the CPU, fp32, no compile
DRY = [
    "trainer.accelerator=cpu",
    "trainer.precision=32-true",
    "compile=false",
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "data.batch_size=4",
    "data.eval_batches=1",
    "trainer.max_steps=2",
    "trainer.val_check_interval=2",
]
COMMON = ["callbacks=none", "logger=none", "print_sample=false"]


def find_data(arg: str | None) -> tuple[Path, bool]:
    """(text file, is it the whole of tiny Shakespeare (1.1 MB), for which the 1.47 goal is set)."""
    path = Path(arg) if arg else FIXTURE
    if not arg:
        for base in (ROOT, ROOT.parent, ROOT.parent.parent):
            p = base / "shared" / "data" / "tinyshakespeare.txt"
            if p.is_file():
                path = p
                break
    return path, path.is_file() and path.stat().st_size > 1_000_000


def peak_tflops(name: str) -> float:
    for key, tf in PEAK_TFLOPS.items():  # the most specific keys come first
        if key.lower() in name.lower():
            return tf
    return math.nan


def steps(data: Path, dry: bool) -> list[dict]:
    """The runs: name, train.py overrides, time limit (s), what to take from the clock."""
    d = [f"data.path={data}"]
    bf16 = ["trainer.precision=bf16-mixed", "trainer.accelerator=gpu", "trainer.devices=1"]
    tput = ["trainer.max_steps=150", "trainer.val_check_interval=1000", "data.eval_batches=5"]
    # time limits sum to 445 s: the whole call stays under 8 minutes with the machine's start
    mini = ["model=mini", "data=shakespeare", "data.tokenizer=char", "data.batch_size=64"]
    out = [
        {"name": "mini", "args": [*mini, *bf16, "compile=true", *tput], "limit": 85},
        {
            "name": "small",
            "args": ["model=small", "data=shakespeare", "data.tokenizer=char", "data.batch_size=32", *bf16]
            + ["compile=true", *tput],
            "limit": 120,
        },
        {"name": "ddp", "args": [*mini, "strategy=ddp", *bf16, *tput], "limit": 55},
        {"name": "deepspeed", "args": [*mini, "strategy=deepspeed", *bf16, *tput], "limit": 75},
        {
            "name": "speedrun",
            "args": ["experiment=shakespeare_speedrun_mini", "trainer.accelerator=gpu", "trainer.devices=1"],
            "limit": 110,
        },
    ]
    for s in out:
        s["args"] = [*s["args"], *d, *(COMMON if s["name"] != "speedrun" else ["print_sample=false"])]
        if dry:  # the same commands with the tiny CPU settings last (later overrides win)
            s["args"] = [a for a in s["args"] if not a.startswith(("trainer.accelerator", "trainer.devices"))]
            s["args"] += [*DRY, "trainer.devices=1"]
            s["limit"] = 120
    if dry:
        # DeepSpeed on a CPU JIT-builds its communication helper first (~30 s): the dry run composes its config
        # (every override checked by Hydra) without training
        out[3]["compose_only"] = True
    return out


def run_step(step: dict, tmp: Path) -> dict:
    clock = tmp / f"{step['name']}.jsonl"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "MICROGPT_BENCH_CLOCK": str(clock),
        "PYTHONPATH": os.pathsep.join([str(BENCH), str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    args = [*step["args"], f"hydra.run.dir={tmp}/{step['name']}"]
    if step.get("compose_only"):
        args = [*args, "--cfg", "job"]
    else:
        args = [*args, "+callbacks.bench_clock._target_=bench_clock.Clock"]
    t0 = time.time()
    try:
        p = subprocess.run(
            [PY, str(ROOT / "train.py"), *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=step["limit"],
        )
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = 124, (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout)
    res = {
        "name": step["name"],
        "command": "python train.py " + " ".join(a for a in step["args"]),
        "rc": rc,
        "wall_s": time.time() - t0,
    }
    if rc != 0:
        res["error"] = out.strip().splitlines()[-1] if out.strip() else f"exit {rc}"
        return res
    if step.get("compose_only"):
        res["composed"] = "strategy" in out
        return res
    m = re.search(r"model: ([0-9,]+) parameters", out)
    res["params"] = int(m.group(1).replace(",", "")) if m else None
    events = [json.loads(line) for line in clock.read_text().splitlines()] if clock.exists() else []
    st = [e for e in events if e["event"] == "step"]
    vals = [e for e in events if e["event"] == "val"]
    after_val = {v["step"] + 1 for v in vals}
    warm = min(20, max(0, len(st) // 4))  # compile and allocator warm-up steps are not timed
    dts = [b["t"] - a["t"] for a, b in zip(st[warm:], st[warm + 1 :]) if b["step"] not in after_val]
    res["median_step_s"] = statistics.median(dts) if dts else math.nan
    first = next((e["t"] for e in events if e["event"] == "first_step"), math.nan)
    res["first_step_s"] = first - t0
    res["val"] = [(v["t"] - t0, v["step"], v["val_loss"]) for v in vals]
    return res


def flash_probe(dry: bool) -> str:
    """Can F.scaled_dot_product_attention use the flash kernel for the models' attention (bf16, causal)?"""
    import torch
    import torch.nn.functional as F

    if dry or not torch.cuda.is_available():
        return "not probed (no GPU)"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q = torch.randn(8, 6, 256, 64, device="cuda", dtype=torch.bfloat16)
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
        return "yes (flash kernel runs for bf16 causal attention, head dim 64)"
    except RuntimeError as e:
        return f"no: {str(e).splitlines()[0]}"


def tokens_per_step(args: list[str]) -> int:
    """batch x block from the overrides, the presets' defaults otherwise (the model's block size)."""
    model = next((a.split("=")[1] for a in args if a.startswith("model=")), "mini")
    block = {"mini": 256, "small": 1024}.get(model, 256)
    batch = 64
    for a in args:  # the last override wins, as in Hydra
        if a.startswith("model.block_size="):
            block = int(a.split("=")[1])
        if a.startswith("data.batch_size="):
            batch = int(a.split("=")[1])
    return batch * block


def model_dims(args: list[str]) -> tuple[int, int, int]:
    """(layers, width, block) of a throughput step's model, for the attention term of the MFU."""
    model = next((a.split("=")[1] for a in args if a.startswith("model=")), "mini")
    n_layer, n_embd, block = {"mini": (6, 384, 256), "small": (12, 768, 1024)}.get(model, (6, 384, 256))
    for a in args:
        k, _, v = a.partition("=")
        if k == "model.n_layer":
            n_layer = int(v)
        elif k == "model.n_embd":
            n_embd = int(v)
        elif k == "model.block_size":
            block = int(v)
    return n_layer, n_embd, block


def report(results: list[dict], gpu: str, peak: float, data: Path, full_data: bool, flash: str) -> tuple[list, dict]:
    by = {r["name"]: r for r in results}
    lines = ["| step | tokens/s | MFU | notes |", "|---|---|---|---|"]
    summary: dict = {}
    for name in ("mini", "small", "ddp", "deepspeed"):
        r = by.get(name)
        if r is None:
            continue
        if r.get("rc") != 0 or "median_step_s" not in r:
            note = "config composed (dry run)" if r.get("composed") else r.get("error", "")
            lines.append(f"| {name} | - | - | {note} |")
            continue
        args = r["command"].split()[2:]
        tok = tokens_per_step(args) / r["median_step_s"]
        n_layer, n_embd, block = model_dims(args)
        params = r.get("params") or 0
        n = params - block * n_embd  # nanoGPT's count leaves the position table out
        flops_per_token = 6 * n + 12 * n_layer * block * n_embd
        mfu = tok * flops_per_token / (peak * 1e12) if peak == peak else math.nan
        summary[name] = {"tok_s": tok, "mfu": mfu, "params": params}
        lines.append(f"| {name} | {tok:,.0f} | {mfu:.1%} | median step {r['median_step_s'] * 1000:.1f} ms |")
    if "ddp" in summary and "deepspeed" in summary:
        ratio = summary["deepspeed"]["tok_s"] / summary["ddp"]["tok_s"]
        summary["deepspeed_over_ddp"] = ratio
        lines.append(f"| deepspeed / ddp (1 GPU) | {ratio:.3f} | | ZeRO-2 on one GPU: sharding gains nothing |")
    r = by.get("speedrun")
    if r is not None:
        if r.get("rc") != 0:
            lines.append(f"| speedrun (mini) | - | - | {r.get('error', '')} |")
        else:
            hit = next(((t, s, v) for t, s, v in r["val"] if v <= TARGET_VAL), None)
            last = r["val"][-1] if r["val"] else (math.nan, 0, math.nan)
            goal = "" if full_data else " (test fixture: the goal does not apply)"
            if hit:
                txt = f"val {hit[2]:.4f} <= {TARGET_VAL} at {hit[0]:.1f} s (step {hit[1]}); goal <= {TARGET_S:.0f} s{goal}"
            else:
                txt = f"val never <= {TARGET_VAL}; last {last[2]:.4f} at {last[0]:.1f} s (step {last[1]}){goal}"
            summary["speedrun"] = {"hit": hit, "last": last, "met": bool(hit and hit[0] <= TARGET_S and full_data)}
            lines.append(f"| speedrun (mini) | | | {txt} |")
    lines += ["", f"GPU: {gpu}; bf16 peak {peak} TFLOP/s. Flash SDPA: {flash}. Data: {data}."]
    return lines, summary


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="every step for 2 steps on the CPU (tiny model)")
    ap.add_argument("--data", default=None, help="tiny Shakespeare text (default: shared/data/tinyshakespeare.txt)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak (default: by name)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these steps (mini small ddp deepspeed speedrun)")
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/results; dry run: none)")
    a = ap.parse_args(argv)
    data, full = find_data(a.data)
    if not data.is_file():
        print(f"error: data file {data} not found; pass --data PATH to tiny Shakespeare", file=sys.stderr)
        return 2
    if not a.dry_run:
        import torch

        if not torch.cuda.is_available():
            print(
                "error: no CUDA GPU visible; run `bench/gpu.sh --dry-run` to check the steps on a CPU", file=sys.stderr
            )
            return 2
        gpu = torch.cuda.get_device_name(0)
    else:
        gpu = "none (dry run on the CPU)"
    peak = a.peak_tflops or peak_tflops(gpu)
    start = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    cmd = " ".join(["bench/gpu.sh", *(argv if argv is not None else sys.argv[1:])])
    out = a.out or (None if a.dry_run else RESULTS)
    flash = flash_probe(a.dry_run)
    results: list[dict] = []

    def write() -> list[str]:  # after every step: a call cut short still leaves what it measured
        lines, summary = report(results, gpu, peak, data, full, flash)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            doc = {"date": start, "command": cmd, "gpu": gpu, "peak_tflops": peak, "runs": results, "summary": summary}
            (out / "gpu.json").write_text(json.dumps(doc, indent=1))
            md = ["# GPU: tokens/s, MFU, DeepSpeed vs DDP, speedrun at mini size", "", f"`{cmd}` — {start}", ""]
            (out / "gpu.md").write_text("\n".join([*md, *lines]) + "\n")
        return lines

    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as tmp:
        for step in steps(data, a.dry_run):
            if a.only and step["name"] not in a.only:
                continue
            r = run_step(step, Path(tmp))
            results.append(r)
            status = "ok" if r["rc"] == 0 else f"FAILED ({r.get('error', '')})"
            print(f"{step['name']:10s} {r['wall_s']:6.1f}s {status}", flush=True)
            lines = write()
    print("\n".join(lines))
    failed = [r["name"] for r in results if r["rc"] != 0]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
