"""LoRA vs full fine-tuning on the same task, same base, same steps (CPU).

    .venv/bin/python bench/lora.py [--base-steps 600] [--steps 200] [--limit 100] [--out bench/results/lora.md]

1. base: `model=micro` (block 128) trained on tiny Shakespeare (character level), `--base-steps` steps;
2. task: speaker attribution built from the same text by `microgpt.tasks` (8 speakers; each speaker's last
   20% of speeches held out), or, when `microgpt.tasks` is missing, held-out loss on the text alone;
3. fine-tunes from that base on the task's train.jsonl (`data=chat`: loss on the answers only): full,
   LoRA (r=8 on qkv/proj/fc), DoRA, LoRA over a fake-quantized base (`+plugin=[lora,qat]`, int8);
   each in its own process, so its peak RSS is its own.

Measured per run: trainable parameters, optimizer state bytes (AdamW's exp_avg + exp_avg_sq, read from the
optimizer after training), params + grads + optimizer state bytes, peak RSS (ru_maxrss of the process,
which includes ~0.4 GB of Python/torch/Lightning), steps/s (train steps 20..end, timed by a callback),
val loss on the task's held-out answers, and the task score (`microgpt.tasks.score`: exact match of the
greedy answer, accuracy of log-likelihood ranking over the labels, majority baseline). Reads
../shared/data/tinyshakespeare.txt (override with --text).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# ../shared next to the checkout (a worktree under wt/ looks one level further up); MICROGPT_SHARED overrides
_SHARED = [Path(os.environ["MICROGPT_SHARED"])] if os.environ.get("MICROGPT_SHARED") else []
SHARED_TEXT = next(
    (
        d / "data" / "tinyshakespeare.txt"
        for d in [*_SHARED, ROOT.parent / "shared", ROOT.parents[1] / "shared"]
        if d.is_dir()
    ),
    ROOT.parent / "shared" / "data" / "tinyshakespeare.txt",
)
PY = sys.executable
BASE_MODEL = ["model=micro", "model.block_size=128"]
QUIET = ["callbacks.progress_bar=null", "callbacks.model_summary=null", "trainer.enable_model_summary=false"]

VARIANTS = {
    "full fine-tune": ["optimizer.lr=5e-4"],
    "LoRA r=8": ["+plugin=lora", "optimizer.lr=5e-3"],
    "DoRA r=8": ["+plugin=lora", "plugins.lora.dora=true", "optimizer.lr=5e-3"],
    "LoRA r=8 + QAT int8 base": ["+plugin=[lora,qat]", "plugins.qat.scheme=int8", "optimizer.lr=5e-3"],
}


# ---- worker: one training run in this process ---------------------------------------------------------------


class StepTimer:
    """A Lightning callback: wall time of the train steps from step `skip` to the end."""

    def __init__(self, skip: int = 20):
        self.skip, self.t0, self.t1, self.n = skip, None, None, 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.skip:
            self.t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.t0 is not None:
            self.n += 1
            self.t1 = time.perf_counter()

    def steps_per_s(self) -> float | None:
        return self.n / (self.t1 - self.t0) if self.t0 is not None and self.t1 and self.n else None


def worker(overrides: list[str], out_json: str) -> None:
    import lightning as L
    from hydra import compose, initialize_config_dir

    from microgpt.training.train import run

    class Timer(StepTimer, L.Callback):
        pass

    timer = Timer()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    # the timer rides along with the configured callbacks
    import microgpt.training.train as train_mod

    build = train_mod.build_callbacks
    train_mod.build_callbacks = lambda c: [*build(c), timer]
    res = run(cfg)
    module, trainer = res["module"], res["trainer"]
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    opt = trainer.optimizers[0]
    opt_bytes = sum(
        t.numel() * t.element_size() for st in opt.state.values() for t in st.values() if hasattr(t, "numel")
    )
    held = sum(p.numel() for g in opt.param_groups for p in g["params"])
    result = {
        "total_params": sum(p.numel() for p in params),
        "trainable_params": sum(p.numel() for p in trainable),
        "optimizer_params": held,
        "optimizer_state_bytes": opt_bytes,
        "train_state_bytes": sum(p.numel() * p.element_size() for p in params)
        + sum(p.numel() * p.element_size() for p in trainable)
        + opt_bytes,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "steps_per_s": timer.steps_per_s(),
        "val_loss": res["val_loss"],
        "last_ckpt": res["last_ckpt"],
        "output_dir": res["output_dir"],
    }
    Path(out_json).write_text(json.dumps(result))


# ---- step time without Lightning, by model size ------------------------------------------------------------------

VARIANT_KEYS = ("full", "lora", "lora_p0", "dora")
SIZES = {  # name: (n_layer, n_head, n_embd, block_size)
    "micro (0.8M)": (4, 4, 128, 128),
    "mini (10.7M)": (6, 6, 384, 256),
}


def step_times(steps: int, batch: int = 12) -> list[dict]:
    """Forward + backward + fused AdamW step of a bare GPT, full vs LoRA vs DoRA (r=8, dropout 0.05), one thread."""
    import torch
    import torch.nn.functional as F

    from microgpt import GPT, GPTConfig
    from microgpt.plugins import load_plugin

    lora = load_plugin("lora")
    torch.set_num_threads(1)
    out = []
    for size, (n_layer, n_head, n_embd, block) in SIZES.items():
        for variant in VARIANT_KEYS:
            torch.manual_seed(0)
            model = GPT(GPTConfig(vocab_size=65, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block))
            if variant != "full":
                p = 0.0 if variant == "lora_p0" else 0.05
                lora.lora(model, rank=8, alpha=16, dropout=p, dora=variant == "dora")
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
            g = torch.Generator().manual_seed(0)
            x, y = (torch.randint(0, 65, (batch, block), generator=g) for _ in range(2))
            times = []
            for i in range(steps + 2):
                t0 = time.perf_counter()
                loss = F.cross_entropy(model(x).view(-1, 65), y.view(-1))
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                if i >= 2:  # the first two steps allocate
                    times.append(time.perf_counter() - t0)
            times.sort()
            out.append(
                {
                    "size": size,
                    "variant": variant,
                    "trainable": sum(p.numel() for p in params),
                    "ms_per_step_median": 1000 * times[len(times) // 2],
                }
            )
            print(json.dumps(out[-1]), flush=True)
    return out


# ---- driver --------------------------------------------------------------------------------------------------


def sh(args: list[str], log: Path) -> None:
    # one intra-op thread per run: the same for every variant, and no oversubscription of a shared machine
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHAO_FORCE_SKIP_LOADING_SO_FILES": "1", "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        p = subprocess.run([PY, *args], cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.returncode != 0:
        sys.exit(f"error: {' '.join(args[:3])}... failed (exit {p.returncode}); see {log}")


def train(name: str, overrides: list[str], work: Path) -> dict:
    out_json = work / f"{name}.json"
    sh([__file__, "--worker", str(out_json), *overrides], work / f"{name}.log")
    return json.loads(out_json.read_text())


def cpu_info() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor()
    fields = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = " ".join(f for f in flags if f.startswith(("avx", "sse4", "amx", "fma")))
    return f"{fields.get('Model name', '?').strip()}, {fields.get('CPU(s)', '?').strip()} CPUs, SIMD flags: {simd}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    ap.add_argument("--text", default=str(SHARED_TEXT))
    ap.add_argument("--base-steps", type=int, default=600)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--limit", type=int, default=100, help="test examples scored per model")
    ap.add_argument("--work", default=str(ROOT / "outputs" / "bench-lora"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "lora.md"))
    ap.add_argument("--only", nargs="*", default=None, help="variant names to run (default: all)")
    ap.add_argument("--step-steps", type=int, default=10, help="timed steps per size in the bare-loop table")
    ap.add_argument("--step-time-only", action="store_true", help="only the bare-loop step time table (printed)")
    args = ap.parse_args()
    if args.worker:
        worker(args.worker[1:], args.worker[0])
        return
    if args.step_time_only:
        step_times(args.step_steps)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    base_dir = work / "base"
    base_over = [*BASE_MODEL, "data=text", f"data.path={args.text}", f"trainer.max_steps={args.base_steps}"]
    base_over += ["trainer.val_check_interval=500", "print_sample=false", f"hydra.run.dir={base_dir}"]
    if not (base_dir / "checkpoints" / "last.ckpt").is_file():
        sh(["train.py", *base_over, *QUIET], work / "base.log")
    base_ckpt = base_dir / "checkpoints" / "last.ckpt"

    import torch

    torch.set_num_threads(1)  # scoring runs here: one thread, like the training runs
    try:
        from microgpt import tasks
    except ImportError:
        tasks = None
    if tasks is None:
        sys.exit("error: microgpt.tasks is missing (speaker-attribution task); merge the chat branch first")
    task_dir = work / "task"
    if not (task_dir / "task.json").is_file():
        tasks.build_speaker_task(input=args.text, out=str(task_dir))
    task_meta = json.loads((task_dir / "task.json").read_text())

    common = [
        *BASE_MODEL,
        f"init_from={base_ckpt}",
        "data=chat",
        f"data.path={task_dir / 'train.jsonl'}",
        f"data.val_path={task_dir / 'test.jsonl'}",
        f"trainer.max_steps={args.steps}",
        f"trainer.val_check_interval={args.steps}",
        "scheduler.warmup_steps=20",
        "print_sample=false",
        "logger=none",
        "callbacks.lr_monitor=null",
        *QUIET,
    ]
    rows = []
    base_score = tasks.score(str(base_ckpt), str(task_dir), limit=args.limit)
    rows.append(("base (zero-shot, corpus format)", None, base_score))
    for name, extra in VARIANTS.items():
        if args.only and name not in args.only:
            continue
        slug = name.split()[0].lower() + ("-qat" if "QAT" in name else "")
        r = train(slug, [*common, *extra, f"paths.output_dir={work / slug}"], work)
        ck = Path(r["output_dir"]) / "checkpoints"
        src = ck if (ck / "adapter.json").is_file() else Path(r["last_ckpt"])
        r["artifact_bytes"] = (
            (ck / "adapter.safetensors").stat().st_size if src == ck else Path(r["last_ckpt"]).stat().st_size
        )
        r["score"] = tasks.score(str(src), str(task_dir), limit=args.limit)
        rows.append((name, r, r["score"]))
        print(name, json.dumps(r), flush=True)
    steps = step_times(args.step_steps)
    write_report(args, rows, task_meta, time.time() - t_start, steps)


def write_report(args, rows, task_meta, seconds: float, steps: list[dict] | None = None) -> None:
    full = next((r for n, r, _ in rows if n == "full fine-tune" and r), None)
    lines = [
        "# LoRA vs full fine-tuning (speaker attribution, CPU)",
        "",
        f"Command: `.venv/bin/python bench/lora.py --base-steps {args.base_steps} --steps {args.steps} --limit {args.limit}`",
        f"({seconds / 60:.1f} min wall). CPU: {cpu_info()}. One torch thread per run (OMP_NUM_THREADS=1); "
        "other engineers' jobs shared the cores, so steps/s compare runs only roughly.",
        "",
        f"Base: `model=micro model.block_size=128` trained {args.base_steps} steps on tiny Shakespeare (char). Task: "
        f"{task_meta.get('task', 'speakers')}, {len(task_meta['labels'])} labels, scored on the first {args.limit} "
        "test examples. Every fine-tune: same base, same data (`data=chat`, loss on the answers), "
        f"{args.steps} steps, batch 12, warmup 20; lr 5e-4 (full) / 5e-3 (adapters).",
        "",
        "| run | trainable params | optimizer state | params+grads+opt state | artifact | peak RSS | steps/s | val loss | exact match | LL accuracy | majority |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def pct(x):
        return "n/a" if x is None else f"{100 * x:.1f}%"

    for name, r, s in rows:
        if r is None:
            lines.append(
                f"| {name} | - | - | - | - | - | - | - | {pct(s['exact_match'])} | {pct(s['ll_accuracy'])} | {pct(s['majority_baseline'])} |"
            )
            continue
        rel = ""
        if full and r is not full:
            rel = f" ({100 * r['trainable_params'] / full['trainable_params']:.1f}%)"
        lines.append(
            f"| {name} | {r['trainable_params']:,}{rel} | {r['optimizer_state_bytes'] / 1e6:.2f} MB | "
            f"{r['train_state_bytes'] / 1e6:.2f} MB | {r['artifact_bytes'] / 1e3:.0f} kB | {r['peak_rss_mb']:.0f} MB | "
            f"{r['steps_per_s']:.2f} | {r['val_loss']:.4f} | {pct(s['exact_match'])} | {pct(s['ll_accuracy'])} | "
            f"{pct(s['majority_baseline'])} |"
        )
    if steps:
        lines += [
            "",
            "Step time without Lightning (bare GPT, batch 12 x block, forward + backward + fused AdamW, one thread,",
            f"median of {args.step_steps} steps; adapters r=8 on qkv/proj/fc with dropout 0.05):",
            "",
            "| model | full ms/step | LoRA ms/step | LoRA, dropout 0, ms/step | DoRA ms/step | LoRA trainable |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for size in dict.fromkeys(s["size"] for s in steps):
            by = {s["variant"]: s for s in steps if s["size"] == size}
            ms = {v: f"{by[v]['ms_per_step_median']:.1f}" if v in by else "not measured" for v in VARIANT_KEYS}
            lines.append(
                f"| {size} | {ms['full']} | {ms['lora']} | {ms['lora_p0']} | {ms['dora']} | "
                f"{by['lora']['trainable']:,} of {by['full']['trainable']:,} |"
            )
    lines += [
        "",
        "artifact: the adapter-only `adapter.safetensors` for adapter runs, the full `last.ckpt` (weights + optimizer",
        "state) for the full fine-tune. Peak RSS includes ~0.4 GB of Python, torch and Lightning. Raw numbers per run:",
        "",
        "```json",
        json.dumps({n: r for n, r, _ in rows if r}, indent=1, default=str),
        "```",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines[: 14 + len(rows)]))


if __name__ == "__main__":
    here = str(Path(__file__).resolve().parent)
    sys.path[:] = [p for p in sys.path if str(Path(p or ".").resolve()) != here]
    main()
