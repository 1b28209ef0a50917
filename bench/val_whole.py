"""Val loss over the *whole* val split, nanoGPT's checkpoints and microgpt's alike: the quality comparison
without the noise of 20 random eval batches.

    .venv/bin/python bench/val_whole.py --nanogpt SEED=WORKDIR ... --microgpt SEED=CKPT ...

WORKDIR: a nanogpt-baseline.sh working copy after its run (out-shakespeare-char/ckpt.pt is nanoGPT's own
checkpoint, written at its last improving evaluation; its model.py rebuilds it). CKPT: a microgpt checkpoint
(`microgpt.load`). Both are scored on consecutive non-overlapping 64-character blocks of the last 10% of tiny
Shakespeare (the split both use), each with its own character vocabulary; loss is mean nats per predicted char.
Writes bench/results/val_whole.{md,json} unless --no-write.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vs_nanogpt import DATA, RESULTS  # noqa: E402

BLOCK = 64


@torch.no_grad()
def blocks_loss(forward, tokens: torch.Tensor, batch: int = 64) -> float:
    n = (len(tokens) - 1) // BLOCK
    total, count = 0.0, 0
    for i in range(0, n, batch):
        idx = torch.arange(i, min(n, i + batch)) * BLOCK
        x = torch.stack([tokens[j : j + BLOCK] for j in idx.tolist()])
        y = torch.stack([tokens[j + 1 : j + 1 + BLOCK] for j in idx.tolist()])
        logits = forward(x)
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1), reduction="sum").item()
        count += y.numel()
    return total / count


def nanogpt_loss(work: Path) -> tuple[float, int]:
    sys.path.insert(0, str(work))
    try:
        from model import GPT, GPTConfig  # nanoGPT's own model.py, from its working copy
    finally:
        sys.path.remove(str(work))
    ck = torch.load(work / "out-shakespeare-char" / "ckpt.pt", map_location="cpu", weights_only=True)
    model = GPT(GPTConfig(**ck["model_args"]))
    model.load_state_dict(ck["model"])
    model.eval()
    val = np.fromfile(work / "data" / "shakespeare_char" / "val.bin", dtype=np.uint16).astype(np.int64)
    tokens = torch.from_numpy(val)

    def fwd(x):  # nanoGPT returns every position's logits only when given targets
        logits, _ = model(x, x)
        return logits

    return blocks_loss(fwd, tokens), int(ck["iter_num"])


def microgpt_loss(ckpt: Path) -> float:
    from microgpt import load

    model, tok = load(str(ckpt))
    model.eval()
    text = DATA.read_text(encoding="utf-8")
    tokens = torch.tensor(tok.encode(text[int(len(text) * 0.9) :]), dtype=torch.long)
    return blocks_loss(model, tokens)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nanogpt", nargs="*", default=[], help="SEED=WORKDIR")
    ap.add_argument("--microgpt", nargs="*", default=[], help="SEED=CKPT")
    ap.add_argument("--no-write", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    res: dict[str, dict[str, float]] = {"nanoGPT": {}, "microgpt": {}}
    iters = {}
    for spec in a.nanogpt:
        s, p = spec.split("=", 1)
        res["nanoGPT"][s], iters[s] = nanogpt_loss(Path(p))
        print(f"nanoGPT seed {s}: {res['nanoGPT'][s]:.4f} (its checkpoint from iter {iters[s]})", flush=True)
    for spec in a.microgpt:
        s, p = spec.split("=", 1)
        res["microgpt"][s] = microgpt_loss(Path(p))
        print(f"microgpt seed {s}: {res['microgpt'][s]:.4f}", flush=True)
    lines = ["| | seeds | whole-val loss, mean ± sd | per seed |", "|---|---|---|---|"]
    for impl, d in res.items():
        v = list(d.values())
        sd = statistics.stdev(v) if len(v) > 1 else math.nan
        per = ", ".join(f"{k}: {x:.4f}" for k, x in d.items())
        lines.append(f"| {impl} | {len(v)} | {statistics.mean(v):.4f} ± {sd:.4f} | {per} |")
    print("\n".join(lines))
    if not a.no_write:
        cmd = " ".join([".venv/bin/python", "bench/val_whole.py", *(argv if argv is not None else sys.argv[1:])])
        (RESULTS / "val_whole.json").write_text(json.dumps({"command": cmd, "loss": res, "nanogpt_iter": iters}))
        md = ["# Val loss over the whole val split (no eval-batch noise)", "", f"`{cmd}`", "", *lines, ""]
        (RESULTS / "val_whole.md").write_text("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
