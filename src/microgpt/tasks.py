"""Task datasets built from text we have, and their scores.

Speaker attribution (who says this speech?) from a play in tiny Shakespeare's "SPEAKER:\\nline...\\n\\n" format:

    python -m microgpt.tasks build input=../shared/data/tinyshakespeare.txt out=tasks/speakers top_n=8
        writes out/train.jsonl and out/test.jsonl ({"prompt": speech, "response": speaker}) and out/task.json
        (labels, counts, the majority-class baseline). The test split holds out each speaker's last
        test_fraction of speeches (split=tail: later scenes) or a random share of them (split=random).

    python -m microgpt.tasks score ckpt=RUN_OR_CKPT task=tasks/speakers [split=test limit=N device=cpu]
        prints one JSON line: exact_match (greedy generation after the chat template equals the label),
        ll_accuracy (the label with the highest log-likelihood, its end-of-turn token included, is right)
        and majority_baseline (always answering the most frequent training label).

A checkpoint without the chat tokens (a base model never fine-tuned on chat data) is scored zero-shot in
the corpus's own format: each label ranked by log P("LABEL:\\n" + speech), the way the play text puts the
speaker before the speech; it has no exact_match (null).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from microgpt.errors import ConfigError, DataError, MicroGPTError
from microgpt.keyvalue import KeyValueCommand

TASK_FILE = "task.json"


# ---- building -------------------------------------------------------------------------------------------


def parse_speeches(text: str) -> tuple[list[tuple[str, str]], int]:
    """'NAME:\\nline\\nline\\n\\n' blocks -> [(name, speech)], and the number of blocks that are not speeches."""
    speeches, skipped = [], 0
    for block in text.replace("\r\n", "\n").split("\n\n"):
        lines = block.strip("\n").split("\n")
        head = lines[0].strip()
        if len(lines) >= 2 and head.endswith(":") and len(head) > 1 and "\n".join(lines[1:]).strip():
            speeches.append((head[:-1].strip(), "\n".join(lines[1:]).strip()))
        elif block.strip():
            skipped += 1
    return speeches, skipped


def build_speaker_task(
    input: str,
    out: str,
    top_n: int = 8,
    test_fraction: float = 0.2,
    split: str = "tail",
    seed: int = 0,
    max_chars: int | None = None,
    min_chars: int = 1,
) -> dict[str, Any]:
    """Write the speaker-attribution task to `out`; returns what task.json holds."""
    if not isinstance(top_n, int) or top_n < 2:
        raise ConfigError(f"top_n must be an integer >= 2 (a classification needs 2 labels), got {top_n!r}")
    if not 0 < test_fraction < 1:
        raise ConfigError(f"test_fraction must be between 0 and 1 (exclusive), got {test_fraction}")
    if split not in ("tail", "random"):
        raise ConfigError(f"split must be 'tail' (each speaker's last speeches) or 'random', got {split!r}")
    if max_chars is not None and max_chars < 1:
        raise ConfigError(f"max_chars must be >= 1 or null, got {max_chars}")
    src = Path(input).expanduser()
    if not src.is_file():
        raise DataError(
            f"input {src} does not exist; pass a play text in 'SPEAKER:\\nspeech\\n\\n' form with input=..."
        )
    try:
        raw = src.read_bytes()
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"input {src} is not UTF-8 ({e.reason} at byte {e.start}); save it as UTF-8") from None
    speeches, skipped = parse_speeches(text)
    speeches = [(who, s) for who, s in speeches if len(s) >= min_chars]
    counts = Counter(who for who, _ in speeches)
    # each label needs a training speech and a test speech
    ranked = sorted((c for c in counts.items() if c[1] >= 2), key=lambda kv: (-kv[1], kv[0]))
    if len(ranked) < top_n:
        raise DataError(
            f"input {src} has {len(ranked)} speakers with 2+ speeches, fewer than top_n={top_n}; lower top_n or "
            "use a longer text in 'SPEAKER:\\nspeech\\n\\n' form"
        )
    labels = [who for who, _ in ranked[:top_n]]
    rng = np.random.default_rng(seed)
    train, test = [], []
    for who in labels:
        mine = [s for w, s in speeches if w == who]
        n_test = min(max(1, round(len(mine) * test_fraction)), len(mine) - 1)
        if split == "random":
            mine = [mine[i] for i in rng.permutation(len(mine))]
        train += [(who, s) for s in mine[:-n_test]]
        test += [(who, s) for s in mine[-n_test:]]
    # interleave the speakers (training reads random examples anyway; this keeps the files readable)
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]

    def clip(s: str) -> str:
        return s if max_chars is None else s[:max_chars]

    train_counts = Counter(w for w, _ in train)
    test_counts = Counter(w for w, _ in test)
    majority = max(labels, key=lambda w: (train_counts[w], -labels.index(w)))
    meta = {
        "task": "speaker_attribution",
        "labels": labels,
        "train_counts": {w: train_counts[w] for w in labels},
        "test_counts": {w: test_counts[w] for w in labels},
        "majority_label": majority,
        "majority_baseline": test_counts[majority] / len(test),
        "source": str(src),
        "source_sha256": hashlib.sha256(raw).hexdigest(),
        "skipped_blocks": skipped,
        "settings": {
            "top_n": top_n,
            "test_fraction": test_fraction,
            "split": split,
            "seed": seed,
            "max_chars": max_chars,
            "min_chars": min_chars,
        },
    }
    from microgpt.data.sources import atomic_write_bytes

    def jsonl(rows: list[tuple[str, str]]) -> bytes:
        return "".join(
            json.dumps({"prompt": clip(s), "response": w}, ensure_ascii=False) + "\n" for w, s in rows
        ).encode()

    dest = Path(out).expanduser()
    try:
        atomic_write_bytes(dest / "train.jsonl", jsonl(train))
        atomic_write_bytes(dest / "test.jsonl", jsonl(test))
        atomic_write_bytes(dest / TASK_FILE, (json.dumps(meta, indent=2, ensure_ascii=False) + "\n").encode())
    except OSError as e:
        raise DataError(f"cannot write the task to {dest} ({e.strerror}); pass a writable out=DIR") from None
    return meta


# ---- scoring --------------------------------------------------------------------------------------------


def read_task(task: str | Path, split: str = "test") -> tuple[dict[str, Any], list[list[dict[str, str]]]]:
    from microgpt.data.chat import read_chat_jsonl

    d = Path(task).expanduser()
    meta_file = d / TASK_FILE
    if not meta_file.is_file():
        raise DataError(
            f"{d} is not a task directory (no {TASK_FILE}); build one with `python -m microgpt.tasks build`"
        )
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
        labels = meta["labels"]
    except (OSError, ValueError, KeyError) as e:
        raise DataError(f"{meta_file} is damaged ({type(e).__name__}: {e}); build the task again") from None
    if not isinstance(labels, list) or len(labels) < 2 or not all(isinstance(x, str) for x in labels):
        raise DataError(f"{meta_file} has no list of 2+ string labels; build the task again")
    f = d / f"{split}.jsonl"
    if not f.is_file():
        raise DataError(f"task {d} has no {split}.jsonl; use split=test or split=train")
    return meta, read_chat_jsonl(f)


def _loglik(model, rows: list[list[int]], starts: list[int]) -> list[float]:
    """Sum of log P(row[t] | row[:t]) over t >= start, for each row (one batched forward, right-padded)."""
    device = getattr(model, "device", None) or next(model.parameters()).device  # OnnxGPT: no parameters
    T = max(len(r) for r in rows)
    x = torch.zeros(len(rows), T - 1, dtype=torch.long)
    y = torch.full((len(rows), T - 1), -100, dtype=torch.long)
    for i, (r, s) in enumerate(zip(rows, starts)):
        t = torch.tensor(r, dtype=torch.long)
        x[i, : len(r) - 1] = t[:-1]
        y[i, s - 1 : len(r) - 1] = t[s:]
    logits = model(x.to(device)).float()
    nll = F.cross_entropy(logits.transpose(1, 2), y.to(device), reduction="none")  # 0 where ignored
    return (-nll.sum(1)).tolist()


@torch.no_grad()
def _greedy(model, prompt: list[int], max_new: int, stop: set[int]) -> list[int]:
    device = getattr(model, "device", None) or next(model.parameters()).device  # OnnxGPT: no parameters
    out: list[int] = []
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    for tok in model.generate_stream(idx, max_new, temperature=0.0):
        t = int(tok[0, 0])
        if t in stop:
            break
        out.append(t)
    return out


@torch.no_grad()
def score_model(model, tokenizer, labels: list[str], convs: list[list[dict[str, str]]], batch_size: int = 16) -> dict:
    """exact_match and ll_accuracy of `model` on `convs` (each ending with the gold assistant label)."""
    from microgpt.data.chat_template import ChatFormat, has_chat_tokens

    model.eval()
    block = model.config.block_size
    golds = [c[-1]["content"] for c in convs]
    unknown = sorted(set(golds) - set(labels))
    if unknown:
        raise DataError(f"the task's examples have labels {unknown[:3]} outside its label set; build the task again")
    gi = [labels.index(g) for g in golds]
    ll_hits, em_hits = 0, 0
    chat = has_chat_tokens(tokenizer)
    if chat:
        fmt = ChatFormat(tokenizer)
        for conv, g in zip(convs, gi):
            ctx = conv[:-1]
            cands = []
            for lab in labels:
                enc = fmt.encode([*ctx, {"role": "assistant", "content": lab}])
                cands.append(enc.ids[enc.last_start :])
            prompt = fmt.encode([*ctx, {"role": "assistant", "content": ""}])
            prompt = prompt.ids[: prompt.last_start]
            longest = max(len(c) for c in cands)
            if longest >= block:
                raise ConfigError(f"a label is {longest} tokens, too long for the model's block_size {block}")
            prompt = prompt[-(block + 1 - longest) :]  # the prompt loses its start, like training data
            scores: list[float] = []
            for b in range(0, len(cands), batch_size):
                part = cands[b : b + batch_size]
                scores += _loglik(model, [prompt + c for c in part], [len(prompt)] * len(part))
            ll_hits += int(int(np.argmax(scores)) == g)
            gen = _greedy(model, prompt, longest, fmt.stop_ids)
            em_hits += int(tokenizer.decode(gen).strip() == labels[g])
    else:
        ctx = tokenizer.encode("\n\n")
        for conv, g in zip(convs, gi):
            speech = tokenizer.encode(conv[-2]["content"] if len(conv) >= 2 else "")
            heads = [tokenizer.encode(f"{lab}:\n") for lab in labels]
            budget = block + 1 - len(ctx) - max(len(h) for h in heads)
            if budget < 1:
                raise ConfigError(f"the model's block_size {block} is too short to hold a label and its speech")
            rows = [ctx + h + speech[:budget] for h in heads]
            scores = []
            for b in range(0, len(rows), batch_size):
                part = rows[b : b + batch_size]
                scores += _loglik(model, part, [len(ctx)] * len(part))
            ll_hits += int(int(np.argmax(scores)) == g)
    n = len(convs)
    return {
        "mode": "chat" if chat else "corpus",
        "n": n,
        "exact_match": em_hits / n if chat else None,
        "ll_accuracy": ll_hits / n,
    }


def score(
    ckpt: str, task: str, split: str = "test", limit: int | None = None, device: str = "cpu", batch_size: int = 16
) -> dict[str, Any]:
    from microgpt import load

    meta, convs = read_task(task, split)
    if limit is not None:
        if limit < 1:
            raise ConfigError(f"limit must be >= 1, got {limit}")
        convs = convs[:limit]
    model, tokenizer = load(ckpt, map_location=device)
    t0 = time.perf_counter()
    result = score_model(model, tokenizer, meta["labels"], convs, batch_size=batch_size)
    golds = Counter(c[-1]["content"] for c in convs)
    majority = meta.get("majority_label") or meta["labels"][0]
    return {
        "task": meta.get("task", Path(task).name),
        "split": split,
        **result,
        "majority_baseline": golds[majority] / len(convs),
        "majority_label": majority,
        "labels": len(meta["labels"]),
        "ckpt": str(ckpt),
        "seconds": round(time.perf_counter() - t0, 2),
    }


# ---- command line ---------------------------------------------------------------------------------------


BUILD = KeyValueCommand(
    prog="python -m microgpt.tasks build",
    help="Build the speaker-attribution task from a play in 'SPEAKER:\\nspeech\\n\\n' form (tiny Shakespeare):\n"
    "  python -m microgpt.tasks build input=PLAY.txt out=DIR [top_n=8 test_fraction=0.2 split=tail|random seed=0]\n"
    "Writes DIR/train.jsonl, DIR/test.jsonl and DIR/task.json (labels, counts, majority baseline).",
    options={
        "input": None,
        "out": None,
        "top_n": 8,
        "test_fraction": 0.2,
        "split": "tail",
        "seed": 0,
        "max_chars": None,
        "min_chars": 1,
    },
    required=("input", "out"),
)
SCORE = KeyValueCommand(
    prog="python -m microgpt.tasks score",
    help="Score a checkpoint on a task built by `build`; prints one JSON line (exact_match, ll_accuracy,\n"
    "majority_baseline, ...):\n  python -m microgpt.tasks score ckpt=RUN_OR_CKPT task=DIR [split=test limit=N device=cpu]",
    options={"ckpt": None, "task": None, "split": "test", "limit": None, "device": "cpu", "batch_size": 16},
    required=("ckpt", "task"),
)
USAGE = "usage: python -m microgpt.tasks build|score key=value ... (see `python -m microgpt.tasks build --help`)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__ if argv else USAGE, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "build":
            kw = BUILD.parse(rest).options
            kw["input"], kw["out"] = str(kw["input"]), str(kw["out"])
            meta = build_speaker_task(**kw)
            print(
                f"wrote {kw['out']}/train.jsonl ({sum(meta['train_counts'].values())} examples), test.jsonl "
                f"({sum(meta['test_counts'].values())}) and {TASK_FILE}: {len(meta['labels'])} speakers, majority "
                f"baseline {meta['majority_baseline']:.3f} ({meta['majority_label']})",
                file=sys.stderr,
            )
            print(json.dumps(meta, ensure_ascii=False))
        elif cmd == "score":
            kw = SCORE.parse(rest).options
            kw["ckpt"], kw["task"], kw["split"] = str(kw["ckpt"]), str(kw["task"]), str(kw["split"])
            print(json.dumps(score(**kw), ensure_ascii=False), flush=True)
        else:
            raise ConfigError(
                f"unknown command {cmd!r}; use `build` or `score` (see `python -m microgpt.tasks --help`)"
            )
    except MicroGPTError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    from microgpt.cli import quiet_env

    quiet_env()
    sys.exit(main())
