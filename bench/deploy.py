"""Deploy benchmark: speed, size and quality of every CPU artifact of a briefly trained model.

    .venv/bin/python bench/deploy.py [--models micro mini small] [--train-seconds 60 90 150] [--threads 1]
                                     [--repeats 3] [--no-compile] [--kernels]

For each model preset (conf/model/<name>.yaml; block_size raised to 512 where the preset's is smaller, so a
64-token prompt + 256 new tokens fit the context: only the position table grows) it trains the model briefly
on the first 90% of tests/fixtures/shakespeare.txt (character tokens, AdamW, batch 8 x 256, for
--train-seconds of wall time: a short run, far from converged), exports it with `microgpt.export`
(safetensors float32 and bfloat16, int8), loads every artifact back with `microgpt.load`, and measures:
  decode    batch 1, a 64-token prompt then 256 greedy new tokens with a KV cache: 256 / wall time
            (the prompt included), for
              fp32 today       GPT.generate_stream (the dynamic cat-growing cache, the path before this work)
              fp32 eager       microgpt.inference.generate_stream (preallocated cache, one-token step), eager
              fp32 trace       the same, the step recorded by torch.jit.trace (the generate CLI's default)
              fp32 compile     the same, the step through torch.compile (compile time reported apart)
              bf16 trace       the bfloat16 export's weights, run in bfloat16
              int8 eager/trace the int8 export as microgpt.load gives it (int8 GEMMs, microgpt.inference)
  prefill   batch 8 x 256 tokens, one forward: tokens/s
  bytes     the artifact's weight file on disk
  val loss  on the last 10% of the same text (the first --val-windows windows of 256 characters), each
            artifact as loaded, and its cost vs the fp32 weights it came from
Variants are interleaved within each repeat and the best (least disturbed) time is kept. With --kernels it
also times one Linear of `small`'s shape (768 -> 3072) under each int8/int4 kernel this torch offers.
If bench/results/llamacpp.json exists (rows {"model","artifact","decode_tok_s","prefill_tok_s","bytes"}),
its rows join the table as llama.cpp rows (`--rewrite` adds them to the committed results without measuring
again). Writes bench/results/deploy.md, deploy.json and deploy.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TORCHAO_FORCE_SKIP_LOADING_SO_FILES", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TEXT = ROOT / "tests" / "fixtures" / "shakespeare.txt"
sys.path.insert(0, str(ROOT / "src"))

import microgpt  # noqa: E402
from microgpt.config import GPTConfig  # noqa: E402
from microgpt.data.tokenizers import CharTokenizer  # noqa: E402
from microgpt.inference import generate_stream, is_int8  # noqa: E402
from microgpt.io.export import export  # noqa: E402
from microgpt.model import GPT  # noqa: E402

PROMPT, NEW, PREFILL_B, PREFILL_T = 64, 256, 8, 256


def preset(name: str, vocab: int) -> dict:
    base = yaml.safe_load((ROOT / "conf" / "model_base.yaml").read_text())
    own = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()) or {}
    d = {**base, **{k: v for k, v in own.items() if k != "defaults"}}
    d.pop("converters", None)
    d["vocab_size"] = vocab
    d["dropout"] = 0.0
    d["block_size"] = max(d["block_size"], 512)
    return d


def train(model: GPT, data: torch.Tensor, seconds: float) -> dict:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3 if model.config.n_embd < 512 else 6e-4, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    t0, step, loss = time.perf_counter(), 0, float("nan")
    while time.perf_counter() - t0 < seconds:
        ix = torch.randint(len(data) - PREFILL_T - 1, (8,), generator=g)
        x = torch.stack([data[i : i + PREFILL_T] for i in ix])
        y = torch.stack([data[i + 1 : i + PREFILL_T + 1] for i in ix])
        out = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        out.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step, loss = step + 1, out.item()
    model.eval()
    return {"steps": step, "seconds": round(time.perf_counter() - t0, 1), "train_loss": round(loss, 4)}


@torch.inference_mode()
def val_loss(model, windows: torch.Tensor) -> float:
    tot, n = 0.0, 0
    for xy in windows.split(PREFILL_B):
        logits = model(xy[:, :-1])
        tot += F.cross_entropy(logits.float().flatten(0, 1), xy[:, 1:].flatten(), reduction="sum").item()
        n += xy[:, 1:].numel()
    return tot / n


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def decode_fn(model, prompt, path: str):
    if path == "today":
        return lambda: [None for _ in model.generate_stream(prompt, NEW, temperature=0.0)]
    return lambda: [None for _ in generate_stream(model, prompt, NEW, temperature=0.0, mode=path)]


def prefill_fn(model, x):
    @torch.inference_mode()
    def f():
        model(x)

    return f


def weight_bytes(summary: dict) -> int:
    return sum(v for k, v in summary["files"].items() if k.endswith((".safetensors", ".gguf", ".pt", ".onnx")))


def bench_model(name: str, args, tok, data, val_windows, work: Path, log) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig(**preset(name, tok.vocab_size))
    model = GPT(cfg)
    tr = train(model, data, args.train_seconds[args.models.index(name)])
    log(f"{name}: {model.num_params() / 1e6:.2f}M params, trained {tr}")
    ck = work / f"{name}.ckpt"
    sd = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "hyper_parameters": {"model": cfg.to_dict(), "tokenizer": tok.to_dict()}}, ck)
    arts, sizes = {}, {}
    for fmt, dtype, key in (
        ("safetensors", "float32", "fp32"),
        ("safetensors", "bfloat16", "bf16"),
        ("int8", "float32", "int8"),
    ):
        summary = export(ck, fmt, work / f"{name}-{key}", dtype=dtype)
        sizes[key] = weight_bytes(summary)
        m, _ = microgpt.load(work / f"{name}-{key}")
        arts[key] = m.to(torch.bfloat16) if key == "bf16" else m
    assert is_int8(arts["int8"]), "the int8 export did not load as an int8 model"
    g = torch.Generator().manual_seed(1)
    prompt = data[:PROMPT][None].clone()
    px = torch.randint(tok.vocab_size, (PREFILL_B, PREFILL_T), generator=g)
    # every decode variant: (artifact, path); greedy agreement with today's path (exactness of the static
    # cache; int8's token agreement), and the one-off cost of its first generation (trace / compile)
    variants = [("fp32", "today"), ("fp32", "eager"), ("fp32", "trace")]
    if args.compile:
        variants.append(("fp32", "compile"))
    variants += [("bf16", "trace"), ("int8", "eager"), ("int8", "trace")]
    ref = torch.cat(list(arts["fp32"].generate_stream(prompt, NEW, temperature=0.0)), 1)
    agree, first = {}, {}
    decode = {}
    for key, path in variants:
        label = f"{key} {path}"
        decode[label] = decode_fn(arts[key], prompt, path)
        if path == "today":
            continue
        t0 = time.perf_counter()
        out = torch.cat(list(generate_stream(arts[key], prompt, NEW, temperature=0.0, mode=path)), 1)
        first[label] = round(time.perf_counter() - t0, 2)
        agree[label] = round((out == ref).float().mean().item(), 4)
        log(f"{name}: {label} first generation {first[label]} s, greedy agreement {agree[label]}")
    prefill = {k: prefill_fn(arts[k], px if k != "bf16" else px) for k in ("fp32", "bf16", "int8")}
    dec_t = {k: [] for k in decode}
    pre_t = {k: [] for k in prefill}
    for f in prefill.values():  # warm-up
        f()
    for r in range(args.repeats):
        for k, f in decode.items():
            if k == "bf16 trace" and r > 0 and name == "small":
                continue  # bf16 is the slow one on this CPU: one timing is enough at 85M
            dec_t[k].append(timed(f))
        for k, f in prefill.items():
            pre_t[k].append(timed(f))
        log(f"{name}: repeat {r + 1}/{args.repeats} done")
    profile = {k: top_ops(prefill[k]) for k in ("fp32", "int8")}
    dprofile = {
        k: top_ops(lambda m=arts[k]: [None for _ in generate_stream(m, prompt, 32, temperature=0.0)])
        for k in ("fp32", "int8")
    }
    vl = {k: round(val_loss(m, val_windows), 4) for k, m in arts.items()}
    log(f"{name}: val loss {vl}")
    rows = []
    for key in ("fp32", "bf16", "int8"):
        paths = [p for p in decode if p.startswith(key)]
        for p in paths:
            rows.append(
                {
                    "model": name,
                    "artifact": p,
                    "runtime": "microgpt",
                    "decode_tok_s": round(NEW / min(dec_t[p]), 1),
                    "prefill_tok_s": round(PREFILL_B * PREFILL_T / min(pre_t[key]), 1),
                    "bytes": sizes[key],
                    "val_loss": vl[key],
                    "val_loss_cost": round(vl[key] - vl["fp32"], 4),
                    "greedy_agreement_vs_today": agree.get(p),
                    "first_generation_s": first.get(p),
                }
            )
    return {
        "model": name,
        "params": model.num_params(),
        "config": {k: cfg.to_dict()[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")},
        "training": tr,
        "compile_seconds": first.get("fp32 compile"),
        "prefill_profile": profile,
        "decode_profile": dprofile,
        "rows": rows,
    }


def top_ops(fn, n: int = 8) -> list[dict]:
    """Where one call of `fn` spends its CPU time: the top operators by self time (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    ev = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in ev) or 1
    return [
        {
            "op": e.key,
            "self_ms": round(e.self_cpu_time_total / 1e3, 2),
            "share": round(e.self_cpu_time_total / total, 3),
        }
        for e in ev[:n]
    ]


def kernels(log) -> list[dict]:
    """One Linear of small's MLP shape (768 -> 3072), batch 1 (decode) and 2048 rows (prefill), per kernel."""
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_

    from microgpt.inference import Int8Linear
    from microgpt.io.export import quantize_per_channel

    torch.manual_seed(0)
    lin = torch.nn.Linear(768, 3072).eval()
    x1, xp = torch.randn(1, 768), torch.randn(PREFILL_B * PREFILL_T, 768)
    q, s = quantize_per_channel(lin.weight)
    cands = {"fp32 nn.Linear": lin, "bf16 nn.Linear": torch.nn.Linear(768, 3072).to(torch.bfloat16)}
    cands["int8 Int8Linear (x86 int8 GEMM, microgpt.inference)"] = Int8Linear(q, s, lin.bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for label, cfg in (
            ("int8 torchao Int8WeightOnlyConfig (eager)", Int8WeightOnlyConfig()),
            ("int8 torchao Int8DynamicActivationInt8WeightConfig (eager)", Int8DynamicActivationInt8WeightConfig()),
        ):
            m = torch.nn.Sequential(torch.nn.Linear(768, 3072)).eval()
            m[0].load_state_dict(lin.state_dict())
            quantize_(m, cfg)
            cands[label] = m
    out = []
    for label, m in cands.items():
        dtype = torch.bfloat16 if label.startswith("bf16") else torch.float32
        a, b = x1.to(dtype), xp.to(dtype)
        with torch.inference_mode():
            for _ in range(3):
                m(a)
            t1 = min(timed(lambda m=m, a=a: [m(a) for _ in range(20)]) for _ in range(3)) / 20
            m(b)
            tp = min(timed(lambda m=m, b=b: m(b)) for _ in range(3))
        out.append({"kernel": label, "decode_us": round(t1 * 1e6, 1), "prefill_2048_ms": round(tp * 1e3, 2)})
        log(f"kernel {label}: {out[-1]}")
    return out


def cpu_info() -> dict:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        return {"model_name": info.get("Model name", "").strip(), "flags": info.get("Flags", "").strip(),
                "cpus": info.get("CPU(s)", "").strip()}  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return {"model_name": platform.processor(), "flags": "", "cpus": str(os.cpu_count())}


def llamacpp_rows() -> list[dict]:
    f = RESULTS / "llamacpp.json"
    if not f.is_file():
        return []
    try:
        rows = json.loads(f.read_text())
        rows = rows.get("rows", rows) if isinstance(rows, dict) else rows
    except ValueError:
        return []
    return [{**r, "runtime": "llama.cpp"} for r in rows if isinstance(r, dict) and "model" in r]


def fmt_bytes(n) -> str:
    return "" if n is None else f"{n / 1e6:.2f} MB"


def _load_note(res: dict) -> str:
    """Whether other jobs shared the CPU: a 1-minute load average before the run at or above the CPU count."""
    if res["load_before"][0] >= float(res["cpu"]["cpus"]):
        return "other jobs kept every CPU busy before the run, so absolute numbers are low and noisy."
    return "the CPUs were not saturated by other jobs before the run."


def write_results(res: dict, out: Path) -> None:
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    lines = [
        "# Deploy: CPU speed, size and quality of every artifact",
        "",
        f"Command: `{res['command']}` ({res['date']}; torch {res['torch']}, torch threads: {res['threads']}).",
        "",
        f"CPU: {res['cpu']['model_name']}, {res['cpu']['cpus']} CPUs. Load average {res['load_before']} before / "
        f"{res['load_after']} after (this benchmark's own {res['threads']} thread(s) count in the 'after' figure); "
        f"{_load_note(res)} Ratios are measured interleaved in one run (best of the repeats).",
        "",
        f"lscpu flags: `{res['cpu']['flags']}`",
        "",
        f"Decode: batch 1, {PROMPT}-token prompt + {NEW} greedy new tokens, KV cache, tokens/s = {NEW} / wall time. "
        f"Prefill: batch {PREFILL_B} x {PREFILL_T} tokens, one forward. Val loss: the last 10% of "
        "tests/fixtures/shakespeare.txt (char tokens), each artifact as `microgpt.load` gives it.",
        "",
        "| model | artifact | runtime | decode tok/s | vs fp32 today | prefill tok/s | vs fp32 | bytes | val loss | cost vs fp32 | greedy = today |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for m in res["models"]:
        base = next(r for r in m["rows"] if r["artifact"] == "fp32 today")
        for r in m["rows"] + [x for x in res["llamacpp"] if x["model"] == m["model"]]:
            d, p = r.get("decode_tok_s"), r.get("prefill_tok_s")
            agree = r.get("greedy_agreement_vs_today")
            dx = f"{d / base['decode_tok_s']:.2f}x" if d else ""
            px = f"{p / base['prefill_tok_s']:.2f}x" if p else ""
            if r["runtime"] == "llama.cpp":  # another run (threads, load, prefill shape): no cross-run ratio
                dx = px = "see llamacpp.md"
            lines.append(
                f"| {m['model']} | {r['artifact']} | {r['runtime']} | {d if d is not None else ''} | "
                f"{dx} | {p if p is not None else ''} | {px} | {fmt_bytes(r.get('bytes'))} | "
                f"{r.get('val_loss', '')} | {r.get('val_loss_cost', '')} | "
                f"{'' if agree is None else f'{agree:.0%}'} |"
            )
    if res["llamacpp"]:
        lines += [
            "",
            "llama.cpp rows: copied from bench/results/llamacpp.json, measured by bench/llamacpp.py in its own run "
            "(2 threads, another load, fresh-init weights, prefill of one 256-token sequence). Their tokens/s are not "
            "comparable with this table's; their ratios against microgpt fp32, measured in that same run, are in "
            "bench/results/llamacpp.md.",
        ]
    lines += ["", "Models (each trained briefly from scratch on the first 90% of the text; far from converged):", ""]
    for m in res["models"]:
        t = m["training"]
        lines.append(
            f"- {m['model']}: {m['params'] / 1e6:.2f}M params, {m['config']}; {t['steps']} AdamW steps of 8 x 256 "
            f"in {t['seconds']} s (train loss {t['train_loss']}); torch.compile of the decode step took "
            f"{m['compile_seconds']} s (first generation, not in the tokens/s)."
        )
    lines += [
        "",
        "Where prefill (8 x 256) spends its time, top operators by self CPU time (torch.profiler, one call):",
        "",
    ]
    for m in res["models"]:
        for k, ops in m.get("prefill_profile", {}).items():
            top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops[:6])
            lines.append(f"- {m['model']} {k}: {top}")
    lines += ["", "Where decode (trace mode, the 64-token prompt + 32 new tokens) spends its time, top operators:", ""]
    for m in res["models"]:
        for k, ops in m.get("decode_profile", {}).items():
            top = ", ".join(f"{o['op']} {o['share']:.0%}" for o in ops[:6])
            lines.append(f"- {m['model']} {k}: {top}")
    if res.get("kernels"):
        lines += [
            "",
            "One Linear of small's MLP shape (768 -> 3072) per kernel (best of 3; decode: 1 row; prefill: 2048 rows):",
            "",
            "| kernel | decode us | prefill ms |",
            "|---|---:|---:|",
        ]
        lines += [f"| {k['kernel']} | {k['decode_us']} | {k['prefill_2048_ms']} |" for k in res["kernels"]]
    lines += ["", f"![tokens/s vs bytes vs val loss]({out.with_suffix('.png').name})", ""]
    out.write_text("\n".join(lines) + "\n")


def plot(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 6))
    rows = [r for m in res["models"] for r in m["rows"] if r["artifact"] != "fp32 today"]
    sc = ax.scatter(
        [r["bytes"] for r in rows],
        [r["decode_tok_s"] for r in rows],
        c=[r["val_loss"] for r in rows],
        cmap="viridis",
        s=60,
    )
    for r in rows:
        ax.annotate(f"{r['model']} {r['artifact']}", (r["bytes"], r["decode_tok_s"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    for r in res["llamacpp"]:
        if r.get("bytes") and r.get("decode_tok_s"):
            ax.scatter([r["bytes"]], [r["decode_tok_s"]], marker="x", color="red")
            ax.annotate(f"{r['model']} llama.cpp {r['artifact']}", (r["bytes"], r["decode_tok_s"]), fontsize=7)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("bytes on disk")
    ax.set_ylabel("decode tokens/s (batch 1)")
    fig.colorbar(sc, label="val loss (held-out text)")
    ax.set_title("microgpt artifacts on this CPU: speed vs size, colour = val loss")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["micro", "mini", "small"])
    ap.add_argument("--train-seconds", nargs="+", type=float, default=[60, 90, 150])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--val-windows", type=int, default=64)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--kernels", action="store_true")
    ap.add_argument("--out", type=Path, default=RESULTS / "deploy.md")
    ap.add_argument(
        "--rewrite", action="store_true", help="only rewrite the .md/.png from the .json (+ llamacpp.json), no runs"
    )
    args = ap.parse_args()
    if args.rewrite:
        res = json.loads(args.out.with_suffix(".json").read_text())
        res["llamacpp"] = llamacpp_rows()
        write_results(res, args.out)
        plot(res, args.out.with_suffix(".png"))
        return
    if len(args.train_seconds) < len(args.models):
        args.train_seconds += [args.train_seconds[-1]] * (len(args.models) - len(args.train_seconds))
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:7.1f}s] {msg}", file=sys.stderr, flush=True)

    text = TEXT.read_text(encoding="utf-8")
    tok = CharTokenizer.fit(text)
    data = torch.tensor(tok.encode(text))
    n = int(len(data) * 0.9)
    train_data, val = data[:n], data[n:]
    w = PREFILL_T + 1
    windows = val[: (len(val) // w) * w].view(-1, w)[: args.val_windows]
    res = {
        "command": "bench/deploy.py " + " ".join(sys.argv[1:]),
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "threads": args.threads,
        "cpu": cpu_info(),
        "load_before": [round(x, 2) for x in os.getloadavg()],
        "val_tokens": windows[:, 1:].numel(),
        "models": [],
        "llamacpp": llamacpp_rows(),
    }
    if args.kernels:
        res["kernels"] = kernels(log)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            res["models"].append(bench_model(name, args, tok, train_data, windows, Path(tmp), log))
            res["load_after"] = [round(x, 2) for x in os.getloadavg()]
            write_results(res, args.out)  # partial results survive an interrupted run
    plot(res, args.out.with_suffix(".png"))
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
