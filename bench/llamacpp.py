"""llama.cpp running our GGUF exports, beside microgpt's own float32 generation, on this CPU.

    .venv/bin/python bench/llamacpp.py [--models micro mini small] [--threads 2] [--repeats 3]

Needs llama-cpp-python (`bash scripts/llamacpp_wheel.sh`, or `make test-llamacpp` once). For each model preset
(conf/model/<name>.yaml, block_size raised to 512 where smaller so a 64-token prompt + 256 new tokens fit the
learned position table, character tokens of tests/fixtures/shakespeare.txt; the weights are a fresh init, as
speed does not depend on their values) it exports GGUF float32 and q8_0 with `microgpt.export` and measures
  decode   batch 1: a 64-token prompt, then 256 greedy new tokens with the KV cache; 256 / wall time (the prompt
           included), as bench/deploy.py counts it;
  prefill  one sequence of 256 tokens in one call; tokens/s;
  bytes    the .gguf file;
for llama.cpp (llama-cpp-python, n_threads = --threads, float16 KV cache: its default, no flash attention,
`use_extra_bufts = false` because its AMX q8_0 kernels crash on multi-token batches here: see docs/llamacpp.md)
and for microgpt float32 (`GPT.generate_stream`, torch threads = --threads). Variants are interleaved in each
repeat and the best time is kept. Writes bench/results/llamacpp.json (rows {"model", "artifact",
"decode_tok_s", "prefill_tok_s", "bytes"}: bench/deploy.py adds the llama.cpp rows to its table) and
bench/results/llamacpp.md.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"
TEXT = ROOT / "tests" / "fixtures" / "shakespeare.txt"
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402
import yaml  # noqa: E402

from microgpt.config import GPTConfig  # noqa: E402
from microgpt.data.tokenizers import CharTokenizer  # noqa: E402
from microgpt.io.export import export  # noqa: E402
from microgpt.model import GPT  # noqa: E402

PROMPT, NEW, PREFILL = 64, 256, 256


def preset(name: str, vocab: int) -> dict:
    base = yaml.safe_load((ROOT / "conf" / "model_base.yaml").read_text())
    own = yaml.safe_load((ROOT / "conf" / "model" / f"{name}.yaml").read_text()) or {}
    d = {**base, **{k: v for k, v in own.items() if k != "defaults"}}
    d.pop("converters", None)
    d.update(vocab_size=vocab, dropout=0.0, block_size=max(d["block_size"], 512))
    return d


@contextlib.contextmanager
def no_extra_buffers(llama_cpp):
    """llama.cpp's loader with use_extra_bufts = false (llama-cli: --no-repack); no constructor argument for it."""
    orig = llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = orig()
        p.use_extra_bufts = False
        return p

    llama_cpp.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama_cpp.llama_cpp.llama_model_default_params = orig


def open_llama(llama_cpp, path: Path, threads: int, n_ctx: int):
    with no_extra_buffers(llama_cpp):
        return llama_cpp.Llama(
            str(path), n_ctx=n_ctx, n_batch=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )


def llama_decode(llm, prompt: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    out = list(itertools.islice(llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True), NEW))
    dt_ = time.perf_counter() - t0
    assert len(out) == NEW
    return dt_


def llama_prefill(llm, ids: list[int]) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(ids)
    return time.perf_counter() - t0


@torch.inference_mode()
def torch_decode(model: GPT, prompt: list[int]) -> float:
    x = torch.tensor([prompt])
    t0 = time.perf_counter()
    n = sum(1 for _ in model.generate_stream(x, NEW, temperature=0.0))
    dt_ = time.perf_counter() - t0
    assert n == NEW
    return dt_


@torch.inference_mode()
def torch_prefill(model: GPT, ids: list[int]) -> float:
    x = torch.tensor([ids])
    t0 = time.perf_counter()
    model(x)
    return time.perf_counter() - t0


def tensor_types(path: Path) -> dict[str, str]:
    """{2-D tensor name: GGML type} of a GGUF file, with each matrix's row length (ne[0])."""
    import gguf

    return {
        t.name: f"{t.tensor_type.name} (rows of {int(t.shape[0])})"
        for t in gguf.GGUFReader(path).tensors
        if len(t.shape) == 2
    }


def cpu_info() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return {
            k: info.get(v, "").strip()
            for k, v in (("model_name", "Model name"), ("flags", "Flags"), ("cpus", "CPU(s)"))
        }
    except (OSError, subprocess.CalledProcessError):
        return {"model_name": "", "flags": "", "cpus": str(os.cpu_count())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["micro", "mini", "small"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        sys.exit("error: llama_cpp is not installed; run `bash scripts/llamacpp_wheel.sh` (builds it once)")
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    text = TEXT.read_text(encoding="utf-8")
    tok = CharTokenizer.fit(text)
    ids = tok.encode(text[len(text) * 9 // 10 :])
    prompt, prefill_ids = ids[:PROMPT], ids[PROMPT : PROMPT + PREFILL]
    rows, microgpt_rows, quant_types = [], [], {}
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        for name in args.models:
            torch.manual_seed(0)
            cfg = GPTConfig(**preset(name, tok.vocab_size))
            model = GPT(cfg).eval()
            ck = work / f"{name}.ckpt"
            sd = {f"model.{k}": v for k, v in model.state_dict().items()}
            torch.save({"state_dict": sd, "hyper_parameters": {"model": cfg.to_dict(), "tokenizer": tok.to_dict()}}, ck)
            llms = {}
            for dtype, label in (("float32", "gguf f32"), ("q8_0", "gguf q8_0")):
                out = work / f"{name}-{dtype}"
                export(ck, "gguf", out, dtype=dtype)
                f = out / "model.gguf"
                llms[label] = (open_llama(llama_cpp, f, args.threads, cfg.block_size), f.stat().st_size)
            # llama.cpp's own k-quant of our float32 file (llama-quantize ... Q4_K_M): rows that are not whole
            # 256-blocks (QK_K) fall back to a 32-block type; the tensor types it chose are recorded
            q4 = work / f"{name}-q4_k_m.gguf"
            qp = llama_cpp.llama_model_quantize_default_params()
            qp.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M
            qp.nthread = args.threads
            f32_file = str(work / f"{name}-float32" / "model.gguf").encode()
            if llama_cpp.llama_model_quantize(f32_file, str(q4).encode(), ctypes.byref(qp)) != 0:
                sys.exit(f"error: llama_model_quantize failed for {name}")
            quant_types[name] = tensor_types(q4)
            llms["gguf Q4_K_M (llama.cpp quantize)"] = (
                open_llama(llama_cpp, q4, args.threads, cfg.block_size),
                q4.stat().st_size,
            )
            best: dict[str, dict[str, float]] = {k: {"decode": 1e9, "prefill": 1e9} for k in [*llms, "microgpt"]}
            for _ in range(args.repeats):  # interleaved: each repeat times every variant once
                for label, (llm, _) in llms.items():
                    best[label]["decode"] = min(best[label]["decode"], llama_decode(llm, prompt))
                    best[label]["prefill"] = min(best[label]["prefill"], llama_prefill(llm, prefill_ids))
                best["microgpt"]["decode"] = min(best["microgpt"]["decode"], torch_decode(model, prompt))
                best["microgpt"]["prefill"] = min(best["microgpt"]["prefill"], torch_prefill(model, prefill_ids))
            for label, (_, nbytes) in llms.items():
                rows.append(
                    {
                        "model": name,
                        "artifact": label,
                        "decode_tok_s": round(NEW / best[label]["decode"], 1),
                        "prefill_tok_s": round(PREFILL / best[label]["prefill"], 1),
                        "bytes": nbytes,
                    }
                )
            microgpt_rows.append(
                {
                    "model": name,
                    "artifact": "microgpt fp32 (GPT.generate_stream)",
                    "decode_tok_s": round(NEW / best["microgpt"]["decode"], 1),
                    "prefill_tok_s": round(PREFILL / best["microgpt"]["prefill"], 1),
                    "bytes": sum(v.numel() * 4 for v in model.state_dict().values()),
                    "params_m": round(model.num_params() / 1e6, 2),
                    "config": {
                        k: cfg.to_dict()[k] for k in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size")
                    },
                }
            )
            print(json.dumps([r for r in rows if r["model"] == name] + microgpt_rows[-1:]), flush=True)
            del llms
    res = {
        "command": "python " + " ".join(sys.argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "threads": args.threads,
        "llama_cpp_python": llama_cpp.__version__,
        "torch": torch.__version__,
        "cpu": cpu_info(),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "llamacpp.json").write_text(json.dumps(rows, indent=1) + "\n")
    res["q4_k_m_tensor_types"] = quant_types
    write_md(res, rows, microgpt_rows)


def write_md(res: dict, rows: list[dict], ours: list[dict]) -> None:
    lines = [
        "# llama.cpp running microgpt's GGUF exports",
        "",
        f"Command: `{res['command']}` ({res['date']}; llama-cpp-python {res['llama_cpp_python']}, "
        f"torch {res['torch']}, {res['threads']} threads for both).",
        "",
        f"CPU: {res['cpu']['model_name']}, {res['cpu']['cpus']} CPUs. Load average (1, 5, 15 min) "
        f"{res['load_before']} before / {res['load_after']} after (this benchmark's own threads count in 'after'); "
        + (
            "other jobs kept every CPU busy before the run, so absolute numbers are low and noisy; "
            if res["load_before"][0] >= float(res["cpu"]["cpus"])
            else "the CPUs were not saturated by other jobs before the run; "
        )
        + "variants are interleaved within each repeat (best of the repeats).",
        "",
        f"lscpu flags: `{res['cpu']['flags']}`",
        "",
        f"Decode: batch 1, {PROMPT}-token prompt + {NEW} greedy new tokens with the KV cache, tokens/s = {NEW} / "
        f"wall time (prompt included). Prefill: one sequence of {PREFILL} tokens in one call. llama.cpp: "
        "llama-cpp-python's `Llama.generate` / `Llama.eval`, float16 KV cache (its default), model loaded with "
        "`use_extra_bufts = false` (the AMX q8_0 path crashes on prompts here, docs/llamacpp.md). Char tokens, "
        "fresh-init weights (speed does not depend on their values); block_size 512.",
        "",
        "| model | params | runtime | artifact | decode tok/s | vs microgpt | prefill tok/s | vs microgpt | bytes |",
        "|---|---:|---|---|---:|---:|---:|---:|---:|",
    ]
    for m in ours:
        for r in [m] + [x for x in rows if x["model"] == m["model"]]:
            runtime = "microgpt" if r is m else "llama.cpp"
            lines.append(
                f"| {m['model']} | {m['params_m']}M | {runtime} | {r['artifact']} | {r['decode_tok_s']} | "
                f"{r['decode_tok_s'] / m['decode_tok_s']:.2f}x | {r['prefill_tok_s']} | "
                f"{r['prefill_tok_s'] / m['prefill_tok_s']:.2f}x | {r['bytes'] / 1e6:.2f} MB |"
            )
    lines += ["", "Models: " + "; ".join(f"{m['model']} {m['config']}" for m in ours), ""]
    lines += [
        "Tensor types `llama_model_quantize(..., Q4_K_M)` chose for each model's matrices (count over the layers). "
        "Q4_K / Q6_K need rows (ne[0], the input width) of a multiple of 256 values (QK_K); narrower rows fall "
        "back to a 32-block type (Q4_K -> Q5_0, Q6_K -> Q8_0), as docs/llamacpp.md explains:",
        "",
    ]
    for name, types in res["q4_k_m_tensor_types"].items():
        groups: dict[str, dict[str, int]] = {}
        for k, v in types.items():
            kind = k.split(".", 2)[2] if k.startswith("blk.") else k
            groups.setdefault(kind, {})
            groups[kind][v] = groups[kind].get(v, 0) + 1
        parts = [f"`{k}` " + " + ".join(f"{n} x {v}" for v, n in g.items()) for k, g in groups.items()]
        lines.append(f"- {name}: " + "; ".join(parts))
    lines.append("")
    (RESULTS / "llamacpp.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
