"""ONNX export (format=onnx) vs the torch model on this CPU: which decode path the graph should ship.

    .venv/bin/python bench/onnx_export.py [--models micro mini] [--threads 2] [--new 128] [--out bench/results/onnx_export.md]

For each model preset (conf/model/*.yaml, char vocabulary of 65, random weights perturbed so logits are not
flat: speed does not depend on the values) the model is exported with `microgpt.io.onnx` (the same graph
`python -m microgpt.export format=onnx` writes) and timed, all in this one process, at --threads threads:

  decode      batch 1, a min(64, block_size/4)-token prompt, greedy tokens up to the context (at most --new):
              torch (GPT.generate_stream, KV cache),
              onnxruntime through the graph's KV cache (OnnxGPT.generate_stream), and onnxruntime without
              the cache (the whole sequence recomputed each token: what a logits-only graph would give)
  prefill     batch 8 x min(256, block_size) tokens, one forward: torch vs onnxruntime
  max diff    the export's own runtime check (onnxruntime vs torch logits, sample batch 2 x 24)

Each timing is the best of --repeat runs after one warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from microgpt.config import GPTConfig  # noqa: E402
from microgpt.data.tokenizers import CharTokenizer  # noqa: E402
from microgpt.io.onnx import OnnxGPT, _kv_shapes, _session, export_graph, runtime_check  # noqa: E402
from microgpt.model import GPT  # noqa: E402


def preset(name: str) -> dict:
    from omegaconf import OmegaConf

    base = OmegaConf.load(ROOT / "conf" / "model_base.yaml")
    own = OmegaConf.load(ROOT / "conf" / "model" / f"{name}.yaml")
    cfg = {**OmegaConf.to_container(base), **{k: v for k, v in OmegaConf.to_container(own).items() if k != "defaults"}}
    cfg.update(vocab_size=65, dropout=0.0, converters=[])
    return cfg


def best(fn, repeat: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def no_cache_decode(model: OnnxGPT, idx: torch.Tensor, n: int) -> None:
    seq = idx
    for _ in range(n):
        nxt = model(seq[:, -model.config.block_size :])[:, -1:].argmax(-1)
        seq = torch.cat([seq, nxt], dim=1)


def run(name: str, args, tmp: Path) -> dict:
    torch.manual_seed(0)
    cfg = GPTConfig.from_dict(preset(name))
    model = GPT(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    d = tmp / name
    d.mkdir()
    t = time.perf_counter()
    export_graph(model, d / "model.onnx")
    export_s = time.perf_counter() - t
    check = runtime_check(model, _session(d / "model.onnx", args.threads))
    # OnnxGPT reads microgpt.json: the fields of the export's record it needs
    tok = CharTokenizer("".join(chr(32 + i) for i in range(65)))
    meta = {"model": cfg.to_dict(), "tokenizer": tok.to_dict()}
    meta["onnx"] = {"kv_shapes": [list(s) for s in _kv_shapes(model)], "file": "model.onnx"}
    (d / "microgpt.json").write_text(json.dumps(meta), encoding="utf-8")
    om = OnnxGPT(d, threads=args.threads)
    g = torch.Generator().manual_seed(1)
    # a prompt and a generation that fit the context: once it is full, both runtimes recompute every token
    plen = min(64, cfg.block_size // 4)
    n = min(args.new, cfg.block_size - plen)
    prompt = torch.randint(0, 65, (1, plen), generator=g)
    with torch.no_grad():
        t_torch = best(lambda: list(model.generate_stream(prompt, n, temperature=0)), args.repeat)
        t_ort = best(lambda: list(om.generate_stream(prompt, n, temperature=0)), args.repeat)
        t_nocache = best(lambda: no_cache_decode(om, prompt, n), max(1, args.repeat - 1))
        T = min(256, cfg.block_size)
        batch = torch.randint(0, 65, (8, T), generator=g)
        p_torch = best(lambda: model(batch), args.repeat)
        p_ort = best(lambda: om(batch), args.repeat)
    params = sum(p.numel() for p in model.parameters())
    return {
        "model": name,
        "params": params,
        "onnx_bytes": (d / "model.onnx").stat().st_size,
        "export_s": export_s,
        "max_diff": check["max_abs_diff"],
        "tol": check["tolerance"],
        "decode": f"{plen}+{n}",
        "torch_tok_s": n / t_torch,
        "ort_kv_tok_s": n / t_ort,
        "ort_nocache_tok_s": n / t_nocache,
        "prefill_T": T,
        "torch_prefill_ms": p_torch * 1e3,
        "ort_prefill_ms": p_ort * 1e3,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["micro", "mini"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "onnx_export.md"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            rows.append(run(name, args, Path(tmp)))
            print(rows[-1], flush=True)
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model_name = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Model name")), "?")
    flags = next((ln.split(":", 1)[1].strip() for ln in cpu.splitlines() if ln.startswith("Flags")), "?")
    simd = " ".join(f for f in flags.split() if f.startswith(("avx", "amx", "fma")) or f in ("f16c",))
    lines = [
        "# ONNX export: onnxruntime vs torch on the CPU",
        "",
        f"Command: `{' '.join([os.path.relpath(sys.executable, ROOT), 'bench/onnx_export.py', *sys.argv[1:]])}`",
        f"CPU: {model_name} ({simd}); threads {args.threads}; torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, Python {platform.python_version()}",
        f"Load average at the end: {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(the machine was shared with other jobs: ratios within one run, not absolute speeds, are the result)",
        "",
        "Decode: batch 1, a prompt of min(64, block_size/4) tokens, then greedy tokens up to the context "
        f"(at most {args.new}); prefill: batch 8 x T tokens; best of "
        f"{args.repeat} after a warm-up. max diff: the export's runtime check (onnxruntime vs torch logits).",
        "",
        "| model | params | model.onnx MB | export s | max diff (tol) | prompt+new | torch decode tok/s | ORT KV-cache tok/s "
        "| ORT no-cache tok/s | KV / no-cache | ORT / torch decode | T | torch prefill ms | ORT prefill ms "
        "| ORT / torch prefill speed |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f}M | {r['onnx_bytes'] / 1e6:.1f} | {r['export_s']:.1f} "
            f"| {r['max_diff']:.1e} ({r['tol']:.1e}) | {r['decode']} | {r['torch_tok_s']:.0f} | {r['ort_kv_tok_s']:.0f} "
            f"| {r['ort_nocache_tok_s']:.0f} | {r['ort_kv_tok_s'] / r['ort_nocache_tok_s']:.2f}x "
            f"| {r['ort_kv_tok_s'] / r['torch_tok_s']:.2f}x | {r['prefill_T']} | {r['torch_prefill_ms']:.1f} "
            f"| {r['ort_prefill_ms']:.1f} | {r['torch_prefill_ms'] / r['ort_prefill_ms']:.2f}x |"
        )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
